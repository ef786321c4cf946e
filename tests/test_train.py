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


@pytest.mark.slow
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
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "padded_tokens_per_s", "mfu"):
        assert key in train_rows[-1], key
    # tokens/s counts real tokens only; the synthetic rows carry some padding
    assert 0 < train_rows[-1]["tokens_per_s"] < train_rows[-1]["padded_tokens_per_s"]
    assert train_rows[-1]["mfu_peak_source"].startswith("measured:")   # CPU: same-run GEMM peak
    assert any("eval_loss" in r and "eval_ppl" in r for r in rows)
    assert (tmp_path / "config.yaml").exists()
    assert jaxllm.load_config(tmp_path / "config.yaml").train.steps == 60  # resolved config reloads


@pytest.mark.slow
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


@pytest.mark.slow   # eager layers are also checked in the default run (test_runs.py)
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


def test_z_loss_adds_its_term_and_changes_the_gradient():
    params = jaxllm.init_params(CFG, jax.random.key(0))
    batch = fixed_batch()
    l0, s0 = make_clm_loss(CFG)(params, batch, None)
    l1, s1 = make_clm_loss(CFG, z_loss=1e-2)(params, batch, None)
    # reference: sum of lse^2 over the counted targets, from full logits
    from jaxllm.objectives.clm import next_token_targets
    logits = jaxllm.forward(params, batch["tokens"], CFG, positions=batch["positions"],
                            segment_ids=batch["segment_ids"])
    _, w = next_token_targets(batch)
    z = 1e-2 * float(jnp.sum(jax.nn.logsumexp(logits, -1) ** 2 * w))
    assert z > 0
    np.testing.assert_allclose(float(l1) - float(l0), z, rtol=1e-5)
    np.testing.assert_allclose(s1["nll"], s0["nll"], rtol=1e-6)   # nll excludes the z term
    g0 = jax.grad(lambda p: make_clm_loss(CFG)(p, batch, None)[0])(params)
    g1 = jax.grad(lambda p: make_clm_loss(CFG, z_loss=1e-2)(p, batch, None)[0])(params)
    assert not np.allclose(g0["lm_head"]["kernel"], g1["lm_head"]["kernel"])


def test_z_loss_applies_to_mlm_too():
    params = jaxllm.init_params(CFG, jax.random.key(0))
    batch, rng = fixed_batch(), jax.random.key(5)
    plain = make_mlm_loss(CFG, mask_id=63)(params, batch, rng)
    with_z = make_mlm_loss(CFG, mask_id=63, z_loss=1e-2)(params, batch, rng)
    assert float(with_z[0]) > float(plain[0]) and float(with_z[1]["z_loss"]) > 0


def test_mlm_needs_an_explicit_or_tokenizer_mask_token(tmp_path):
    cfg = jaxllm.load_config(None, QUIET + ["model=tiny", "train.objective=mlm", "train.steps=1",
                                            f"train.run_dir={tmp_path}"])
    with pytest.raises(jaxllm.ConfigError, match="needs a mask token: this data has no tokenizer"):
        jaxllm.train(cfg)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        make_mlm_loss(CFG, mask_id=CFG.vocab_size)


def test_mlm_microbatch_accumulation_is_token_weighted():
    # MLM draws its masks from the step's per-microbatch keys; rebuild those by hand and check
    # the step's loss is the token-weighted mean over microbatches of unequal mask counts
    opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1), 10)
    batch = fixed_batch(b=8)
    loss = make_mlm_loss(CFG, mask_id=63, mask_prob=0.3)
    state = new_state(opt)
    _, m = make_train_step(loss, opt, microbatches=2)(new_state(opt), batch, None)
    _, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    sums = weights = 0.0
    for i in range(2):   # microbatch i holds rows i, i+2, i+4, ...
        mb = jax.tree.map(lambda x: x[i::2], batch)
        loss_sum, s = loss(state.params, mb, jax.random.fold_in(step_rng, i))
        sums, weights = sums + float(loss_sum), weights + float(s["weight"])
    np.testing.assert_allclose(float(m["loss"]), sums / weights, rtol=1e-5)
    np.testing.assert_allclose(float(m["weight"]), weights)


def test_evaluate_returns_token_weighted_loss_ppl_and_accuracy():
    from jaxllm.training.pretrain import evaluate
    from jaxllm.training.step import make_eval_step
    params = jaxllm.init_params(CFG, jax.random.key(0))
    batches = [fixed_batch(b=4, t=32), jax.tree.map(jnp.asarray, next(synthetic_batches(
        seq_len=32, global_batch_size=4, vocab_size=CFG.vocab_size, seed=9)))]
    batches[1]["loss_mask"] = batches[1]["loss_mask"].at[:, 16:].set(0)  # unequal weights
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:1])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = evaluate(make_eval_step(make_clm_loss(CFG)), params, lambda: iter(batches), sharding)
    nll = w = hits = 0.0
    from jaxllm.objectives.clm import next_token_targets
    for b in batches:   # by hand, from full logits
        logits = jaxllm.forward(params, b["tokens"], CFG, positions=b["positions"], segment_ids=b["segment_ids"])
        y, wt = next_token_targets(b)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
        nll += float(-jnp.sum(lp * wt))
        w += float(jnp.sum(wt))
        hits += float(jnp.sum((jnp.argmax(logits, -1) == y) * wt))
    np.testing.assert_allclose(out["eval_loss"], nll / w, rtol=1e-5)
    np.testing.assert_allclose(out["eval_ppl"], np.exp(nll / w), rtol=1e-5)
    np.testing.assert_allclose(out["eval_accuracy"], hits / w, rtol=1e-5)


def test_weight_decay_skips_norms_and_biases():
    from jaxllm.training.optim import decay_mask
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, qkv_bias=True)
    params = jaxllm.init_params(cfg, jax.random.key(0))
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v
            for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not flat["layers/attn/q/bias"] and not flat["layers/attn_norm/scale"]
    assert not flat["final_norm/scale"]
    assert flat["layers/attn/q/kernel"] and flat["embed/embedding"] and flat["lm_head/kernel"]
    # and the optimizer really applies it: with zero gradients only decayed tensors move
    opt = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0), 10)
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, state, params)
    moved = {jax.tree_util.keystr(k, simple=True, separator="/"): bool(jnp.any(v != 0))
             for k, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
    assert moved == flat


def test_bf16_compute_train_step_learns():
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      compute_dtype="bfloat16")
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=5, weight_decay=0.0), 60)
    step = make_train_step(make_clm_loss(cfg), opt)
    state = TrainState.create(jaxllm.init_params(cfg, jax.random.key(0)), opt, jax.random.key(1))
    batch = fixed_batch()
    losses = []
    for _ in range(60):
        state, m = step(state, batch, None)
        losses.append(float(m["loss"]))
    assert state.params["lm_head"]["kernel"].dtype == jnp.float32   # fp32 masters
    assert losses[-1] < 0.3 * losses[0]


def test_bf16_moments_halve_the_optimizer_state_and_train_like_fp32():
    """optim.moment_dtype=bfloat16: mu and nu are bf16 from init on (the skip wrapper keeps the
    dtype through updates), the state's bytes halve, they move every step, and a fixed-batch
    fit follows the fp32-moment loss curve closely."""
    def run(moment_dtype, steps=60):
        opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=5, moment_dtype=moment_dtype), steps)
        step = make_train_step(make_clm_loss(CFG), opt)
        state, batch = new_state(opt), fixed_batch()
        losses = []
        for _ in range(steps):
            state, m = step(state, batch, None)
            losses.append(float(m["loss"]))
        return state, np.array(losses)

    def moments(state):
        return [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    s32, l32 = run("")
    s16, l16 = run("bfloat16")
    assert {x.dtype for x in moments(s32)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in moments(s16)} == {jnp.dtype(jnp.bfloat16)}
    assert sum(x.nbytes for x in moments(s16)) * 2 == sum(x.nbytes for x in moments(s32))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(s16.params))   # fp32 masters
    assert min(float(jnp.abs(x.astype(jnp.float32)).max()) for x in moments(s16)) > 0
    assert l16[-1] < 0.3 * l16[0]                                  # it trains
    np.testing.assert_allclose(l16, l32, rtol=0.1, atol=0.05)      # like fp32 moments
    with pytest.raises(Exception, match="moment_dtype"):
        jaxllm.load_config(None, ["optim.moment_dtype=int8"])
