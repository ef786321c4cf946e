"""Training: the step learns, accumulation is exact, the loop writes its run directory."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxllm
from jaxllm.config import ModelConfig, OptimConfig
from jaxllm.data.tokens import synthetic_batches
from jaxllm.objectives import make_clm_loss, make_mlm_loss
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import TrainState
from jaxllm.training.step import make_train_step

CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
QUIET = ["train.progress=false", "mesh.devices=1", "data.kind=synthetic_tokens"]


def fixed_batch(b=4, t=32):
    return jax.tree.map(jnp.asarray, next(synthetic_batches(seq_len=t, global_batch_size=b,
                                                            vocab_size=CFG.vocab_size, seed=0)))


def new_state(optimizer, seed=0):
    return TrainState.create(jaxllm.init_params(CFG, jax.random.key(seed)), optimizer, jax.random.key(1))


def test_tiny_model_overfits_a_fixed_batch():
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=5, weight_decay=0.0), 150)
    step = make_train_step(make_clm_loss(CFG), opt)
    state, batch = new_state(opt), fixed_batch()
    for _ in range(150):
        state, m = step(state, batch, None)
    assert float(m["loss"]) < 0.1


def test_microbatch_accumulation_equals_full_batch():
    opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1), 10)
    batch = fixed_batch(b=8)
    # uneven token counts per microbatch: token weighting must still give the full-batch mean
    batch["loss_mask"] = batch["loss_mask"].at[:3, 20:].set(0)
    s1, m1 = make_train_step(make_clm_loss(CFG), opt)(new_state(opt), batch, None)
    s4, m4 = make_train_step(make_clm_loss(CFG), opt, microbatches=4)(new_state(opt), batch, None)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(s1.params, s4.params, rtol=1e-5, atol=1e-7)


def test_loss_mask_selects_exactly_the_marked_targets():
    loss_fn = make_clm_loss(CFG)
    params = jaxllm.init_params(CFG, jax.random.key(0))
    b, t = 4, 32
    batch = {"tokens": jax.random.randint(jax.random.key(1), (b, t), 2, CFG.vocab_size),
             "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32),
             "loss_mask": jnp.zeros((b, t), jnp.int32).at[:, 10:].set(1)}
    # targets are tokens 10..T-1 (predicted from positions 9..T-2): exactly b * (t - 10)
    _, sums = loss_fn(params, batch, None)
    assert float(sums["weight"]) == b * (t - 10)
    # changing tokens 0..8 changes counted predictions (causal context), changing token 9's
    # *target role* does not exist: token 9 is not a target, but it is context for target 10
    logits = jaxllm.forward(params, batch["tokens"], CFG)
    lp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(lp, batch["tokens"][:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(sums["nll"], jnp.sum(nll[:, 9:]), rtol=1e-5)
    # a document boundary removes the target at the first token of the next document
    seg = batch["segment_ids"].at[:, 20:].set(2)
    _, sums2 = loss_fn(params, dict(batch, segment_ids=seg), None)
    assert float(sums2["weight"]) == b * (t - 10 - 1)


def test_nonfinite_gradients_skip_the_update():
    opt = make_optimizer(OptimConfig(lr=1e-3), 10)
    state = new_state(opt)
    before = jax.device_get(state.params)

    def poisoned(params, batch, rng):
        loss, m = make_clm_loss(CFG)(params, batch, rng)
        return loss * jnp.nan, m
    state, m = make_train_step(poisoned, opt)(state, fixed_batch(), None)
    chex.assert_trees_all_equal(jax.device_get(state.params), before)
    assert int(state.opt_state.skipped) == 1 and int(state.opt_state.applied) == 0


def test_nonfinite_update_with_finite_gradients_is_skipped():
    # eps=0, b2=0: an untouched embedding row has g = 0, so Adam's update is 0/0 = NaN while
    # every gradient is finite (optax.apply_if_finite, which checks gradients only, applies it)
    opt = make_optimizer(OptimConfig(lr=1e-3, eps=0.0, b2=0.0, clip_norm=0.0), 10)
    state = new_state(opt)
    before = jax.device_get(state.params)
    grads = jax.grad(lambda p: make_clm_loss(CFG)(p, fixed_batch(), None)[0])(state.params)
    adam = optax.adamw(1e-3, b2=0.0, eps=0.0)
    inner_updates, _ = adam.update(grads, adam.init(state.params), state.params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(inner_updates))
    state, _ = make_train_step(make_clm_loss(CFG), opt)(state, fixed_batch(), None)
    chex.assert_trees_all_equal(jax.device_get(state.params), before)
    assert int(state.opt_state.skipped) == 1 and int(state.opt_state.skipped_in_a_row) == 1


def test_loss_falls_on_synthetic_stream_and_run_dir_is_written(tmp_path):
    cfg = jaxllm.load_config("configs/pretrain/tiny.yaml",
                             QUIET + ["train.steps=60", "train.eval_every=60", "train.eval_batches=2",
                                      f"train.run_dir={tmp_path}"])
    s = jaxllm.train(cfg)
    assert s["final_loss"] < 0.6 * s["first_loss"]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in train_rows[-1], key
    assert any("eval_loss" in r and "eval_ppl" in r for r in rows)
    assert (tmp_path / "config.yaml").exists()
    assert jaxllm.load_config(tmp_path / "config.yaml").train.steps == 60  # resolved config reloads


def test_mlm_loss_falls(tmp_path):
    cfg = jaxllm.load_config("configs/pretrain/tiny.yaml",
                             QUIET + ["train.objective=mlm", "train.mlm_mask_id=511", "train.steps=120",
                                      "train.eval_every=0",
                                      "train.log_every=10", f"train.run_dir={tmp_path}"])
    s = jaxllm.train(cfg)
    assert s["final_loss"] < 0.75 * s["first_loss"]


def test_mlm_masks_fifteen_percent_with_80_10_10():
    from jaxllm.objectives.mlm import mask_tokens
    toks = jnp.full((64, 256), 5, jnp.int32)
    seg = jnp.ones_like(toks).at[:, 200:].set(0)
    replacements = jnp.arange(10, 1000)    # real tokens only: never 0..9 (specials) or the mask
    corrupted, sel = mask_tokens(toks, seg, jax.random.key(0), replacements, mask_id=999, mask_prob=0.15)
    assert not bool(jnp.any(sel[:, 200:]))
    frac = float(jnp.mean(sel[:, :200]))
    assert 0.14 < frac < 0.16
    n = float(jnp.sum(sel))
    as_mask = float(jnp.sum(sel & (corrupted == 999))) / n
    kept = float(jnp.sum(sel & (corrupted == 5))) / n
    assert 0.77 < as_mask < 0.83 and 0.08 < kept < 0.12
    replaced = corrupted[sel & (corrupted != 999) & (corrupted != 5)]
    assert replaced.size > 0 and bool(jnp.all(replaced >= 10))  # drawn from real tokens only


def test_same_seed_same_run(tmp_path):
    args = QUIET + ["model=tiny", "train.steps=4", "train.log_every=1", "train.eval_every=0",
                    "train.batch_size=4", "train.seq_len=32"]
    a = jaxllm.train(jaxllm.load_config(None, args + [f"train.run_dir={tmp_path}/a"]))
    b = jaxllm.train(jaxllm.load_config(None, args + [f"train.run_dir={tmp_path}/b"]))
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    chex.assert_trees_all_equal(jax.device_get(a["state"].params), jax.device_get(b["state"].params))


def test_debug_mode_runs_eagerly_on_one_device(tmp_path):
    cfg = jaxllm.load_config(None, ["model=tiny", "train.steps=2", "train.batch_size=2",
                                    "train.seq_len=16", "train.eval_every=0", "train.progress=false",
                                    "train.debug=true", "train.disable_jit=true",
                                    f"train.run_dir={tmp_path}"])
    try:
        s = jaxllm.train(cfg)
    finally:
        jax.config.update("jax_debug_nans", False)
    assert s["steps"] == 2 and np.isfinite(s["final_loss"])
    assert len(s["state"].params["embed"]["embedding"].sharding.device_set) == 1
