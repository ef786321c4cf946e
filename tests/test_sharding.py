"""A sharded run equals the single-device run: same losses and parameters over 3 steps."""
import chex
import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.parallel import rules as R

BASE = ["model=tiny", "model.vocab_size=128", "train.steps=3", "train.batch_size=8",
        "train.seq_len=32", "train.log_every=1", "train.eval_every=0", "train.progress=false",
        "optim.warmup_steps=0", "optim.lr=1e-3"]


def run(tmp_path, name, *overrides):
    cfg = jaxllm.load_config(None, BASE + [f"train.run_dir={tmp_path / name}", *overrides])
    s = jaxllm.train(cfg)
    return [h["loss"] for h in s["history"]], jax.device_get(s["state"].params), s["state"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "single", "mesh.devices=1")


@pytest.mark.parametrize("mesh", [
    ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.preset=fsdp_tp"],
    # the default run keeps the 3-axis mesh; the single-axis meshes and microbatching: slow
    pytest.param(["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "mesh.preset=fsdp"], marks=pytest.mark.slow),
    pytest.param(["mesh.devices=2", "mesh.fsdp=1", "mesh.tensor=2", "mesh.preset=fsdp_tp"],
                 marks=pytest.mark.slow),
    pytest.param(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.preset=fsdp_tp", "train.microbatches=2"],
                 marks=pytest.mark.slow),
], ids=["data2_fsdp2_tensor2", "fsdp8", "tensor2", "data2_fsdp2_tensor2_microbatch2"])
def test_sharded_step_matches_single_device(tmp_path, single, mesh):
    assert len(jax.devices()) == 8, "conftest must give 8 CPU devices"
    losses0, params0, _ = single
    losses, params, state = run(tmp_path, "sharded", *mesh)
    assert len(losses) == 3
    np.testing.assert_allclose(losses, losses0, rtol=1e-5)
    # Per-tensor relative error ||p - p0|| / ||p0||. (Elementwise it is ill-posed: Adam's
    # g / sqrt(v) turns reduction-order noise on a ~0 gradient into a full lr-sized step.)
    for path, a, b in zip(*zip(*jax.tree_util.tree_flatten_with_path(params)[0]),
                          jax.tree.leaves(params0)):
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
        assert rel < 1e-5, (jax.tree_util.keystr(path), rel)
    chex.assert_trees_all_equal_shapes(params, params0)
    # the parameters really were sharded as the rules say
    q = state.params["layers"]["attn"]["q"]["kernel"]
    if "mesh.fsdp=8" in mesh:
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
        mu = state.opt_state.inner[1][0].mu["layers"]["attn"]["q"]["kernel"]
        assert mu.sharding.spec == q.sharding.spec  # Adam moments follow their parameter
    if "mesh.tensor=2" in mesh:
        assert "tensor" in q.sharding.spec


def test_rules_drop_mesh_axes_that_do_not_divide_and_the_report_says_so():
    mesh = jax.make_mesh((1, 1, 8), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = R.logical_rules(jaxllm.config.MeshConfig(preset="fsdp_tp"))
    spec = R.logical_to_mesh_spec(jax.sharding.PartitionSpec("embed", "kv_heads", "head_dim"),
                                  (64, 2, 16), rules, mesh)
    assert spec == jax.sharding.PartitionSpec(None, None, None)  # 2 kv heads cannot split 8 ways
    cfg = jaxllm.ModelConfig(vocab_size=128, d_model=64, n_heads=8, n_kv_heads=2, d_ff=128)
    rep = R.sharding_report(jaxllm.param_logical_axes(cfg),
                            jax.eval_shape(lambda: jaxllm.init_params(cfg, jax.random.key(0))), rules, mesh)
    dropped = " ".join(rep["dropped"])
    assert "layers/attn/k/kernel" in dropped and "layers/attn/v/kernel" in dropped
    assert "layers/attn/q/kernel" not in dropped                 # 8 heads split 8 ways
    k_bytes = 2 * (2 * 64 * 2 * 8) * 4     # k and v kernels: (layers, d, kv_heads, head_dim), fp32
    np.testing.assert_allclose(rep["replicated_fraction"], k_bytes / rep["total_bytes"])


@pytest.mark.slow
def test_silent_replication_is_refused(tmp_path, capsys):
    # d_model=100 cannot split over fsdp=8: every matrix and its Adam moments would be
    # replicated on all 8 devices while the preset says "shard"
    args = BASE + [f"train.run_dir={tmp_path}", "model.d_model=100", "model.n_heads=2",
                   "mesh.fsdp=8"]
    with pytest.raises(jaxllm.ConfigError, match=r"(99|100)% of parameter bytes .* would be replicated"):
        jaxllm.train(jaxllm.load_config(None, args))
    assert "not divisible by mesh fsdp=8" in capsys.readouterr().err
    # raising the tolerance accepts it, and the table still says what happened
    s = jaxllm.train(jaxllm.load_config(None, args + ["mesh.replication_tolerance=1", "train.steps=1"]))
    assert s["steps"] == 1
    err = capsys.readouterr().err
    assert "layers/mlp/up/kernel" in err and "MiB/device" in err


@pytest.mark.slow
def test_idle_mesh_axis_is_said(tmp_path, capsys):
    jaxllm.train(jaxllm.load_config(None, BASE + [f"train.run_dir={tmp_path}", "train.steps=1",
                                                  "mesh.fsdp=4", "mesh.tensor=2", "mesh.preset=fsdp"]))
    assert "mesh.tensor=2 shards nothing under mesh.preset=fsdp" in capsys.readouterr().err


def _rank_and_frozen_step(mesh_shape, preset):
    """One step of an objective reading a (B,) and a (B, K, T) batch leaf and a frozen,
    sharded reference model; -> (loss, updated params, frozen sharding of q)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxllm.config import MeshConfig, OptimConfig
    from jaxllm.model.heads import token_stats
    from jaxllm.training.optim import make_optimizer
    from jaxllm.training.setup import make_state, plan_state
    from jaxllm.training.step import make_train_step
    cfg = jaxllm.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    n = int(np.prod(mesh_shape))
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = R.logical_rules(MeshConfig(preset=preset))
    b, k, t = 8, 3, 16
    batch = {"adv": jax.random.normal(jax.random.key(1), (b,)),
             "resp": jax.random.randint(jax.random.key(2), (b, k, t), 0, cfg.vocab_size)}

    def merge(trainable, frozen):
        return {"policy": trainable, "ref": frozen}

    def loss_fn(p, batch, rng):
        toks = batch["resp"].reshape(b_local := batch["resp"].shape[0] * k, t)

        def row_logprob(params):
            h, _ = jaxllm.trunk(params, toks, cfg)
            return jnp.sum(token_stats(params, h[:, :-1], toks[:, 1:], cfg)["logprob"], -1)
        diff = (row_logprob(p["policy"]) - row_logprob(p["ref"])).reshape(-1, k)
        return jnp.sum(batch["adv"][:, None] * diff), {"weight": jnp.asarray(b_local, jnp.float32)}

    opt = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
    specs = jaxllm.param_logical_axes(cfg)
    init = lambda key: jaxllm.init_params(cfg, key)   # noqa: E731
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, sh = plan_state(init, specs, opt, rules, mesh, frozen_specs=specs,
                           frozen_shapes=jax.eval_shape(init, jax.random.key(0)))
        state = make_state(init, opt, sh, seed=0)
        frozen = jax.device_put(jaxllm.init_params(cfg, jax.random.key(7)), sh.frozen)
        batch = jax.device_put(batch, sh.batch)
        step = make_train_step(loss_fn, opt, sh, merge=merge)
        state, m = step(state, batch, frozen)
        state, m = step(state, batch, frozen)
        return float(m["loss"]), jax.device_get(state.params), frozen["layers"]["attn"]["q"]["kernel"].sharding.spec


@pytest.mark.slow
def test_batch_leaves_of_any_rank_and_a_sharded_frozen_tree():
    loss1, params1, _ = _rank_and_frozen_step((1, 1, 1), "fsdp_tp")
    loss8, params8, frozen_spec = _rank_and_frozen_step((2, 2, 2), "fsdp_tp")
    assert frozen_spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
