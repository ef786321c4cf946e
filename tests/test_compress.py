"""Compressed gradient reduction over the data axis (bf16; int8 with per-block scales and error
feedback): the sums it returns, what the compiled step communicates, and training with it."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxllm
from jaxllm.config import MeshConfig, ModelConfig, OptimConfig
from jaxllm.data.tokens import synthetic_batches
from jaxllm.objectives import make_clm_loss
from jaxllm.parallel import compress
from jaxllm.parallel import rules as R
from jaxllm.training.optim import make_optimizer
from jaxllm.training.setup import make_state, plan_state
from jaxllm.training.step import make_train_step

N = 4


def _mesh():
    return jax.make_mesh((N, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:N],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_int8_sum_is_close_and_error_feedback_removes_its_bias():
    mesh = _mesh()
    g = jax.random.normal(jax.random.key(0), (N, 1000)) * jnp.linspace(0.01, 3, 1000)   # per shard
    exact = g.sum(0)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")),
                       out_specs=(P(), P("data")), check_vma=False)
    def reduce(g, e):
        total, new_e = compress.allreduce_int8(g[0], e[0], "data", N, block=128)
        return total, new_e[None]

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False)
    def reduce_bf16(g):
        return compress.allreduce_bf16(g[0], "data")
    # bf16: each element within bf16's relative precision (2^-8, x2 for the sum's roundings) of
    # the sum of magnitudes it was added from
    assert bool(jnp.all(jnp.abs(reduce_bf16(g) - exact) <= 2.0 ** -7 * jnp.abs(g).sum(0) + 1e-6))
    err = jnp.zeros_like(g)
    one, err1 = reduce(g, err)
    scale = float(jnp.max(jnp.abs(exact)))
    single = float(jnp.max(jnp.abs(one - exact)))
    assert 0 < single < 0.03 * scale                        # int8: ~1% of the block maximum
    # each shard's residual is exactly what its quantization dropped (|e| <= half a step)
    assert float(jnp.max(jnp.abs(err1))) <= 0.5 * float(jnp.max(jnp.abs(g))) / 127 + 1e-6
    # with feedback, the running mean of repeated reductions of the same gradient converges to
    # the sum up to the (unfed-back) re-quantization of the partial sums: half an int8 step of
    # the summed block, plus the last residual spread over the 40 steps
    outs, e = [], err
    for _ in range(40):
        out, e = reduce(g, e)
        outs.append(out)
    averaged = float(jnp.max(jnp.abs(jnp.mean(jnp.stack(outs), 0) - exact)))
    bound = 0.6 * scale / 127 + N * float(jnp.max(jnp.abs(g))) / 127 / 40
    assert averaged < bound < single, (averaged, bound, single)


def _train(method, steps=25):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    mesh = _mesh()
    rules = R.logical_rules(MeshConfig(preset="dp"))
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), steps)
    init = lambda key: jaxllm.init_params(cfg, key)   # noqa: E731
    batch = next(synthetic_batches(seq_len=32, global_batch_size=8, vocab_size=cfg.vocab_size, seed=0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, sh = plan_state(init, jaxllm.param_logical_axes(cfg), opt, rules, mesh)
        state = make_state(init, opt, sh, seed=0)
        if method == "int8":
            state, sh = compress.with_error_feedback(state, sh, mesh)
        step = make_train_step(make_clm_loss(cfg), opt, sh, grad_compression=method, mesh=mesh)
        batch = jax.device_put(batch, sh.batch)
        lowered = step.lower(state, batch, None)
        hlo = lowered.compile().as_text() + "\n" + lowered.as_text()
        losses = []
        for _ in range(steps):
            state, m = step(state, batch, None)
            losses.append(float(m["loss"]))
    return np.array(losses), hlo


@pytest.mark.slow
def test_training_with_compressed_gradients_follows_fp32():
    ref, ref_hlo = _train("none")
    bf16, bf16_hlo = _train("bf16")
    int8, int8_hlo = _train("int8")
    assert ref[-1] < 0.7 * ref[0]
    np.testing.assert_allclose(bf16, ref, rtol=2e-2)
    np.testing.assert_allclose(int8, ref, rtol=3e-2)
    assert not np.array_equal(int8, ref)                     # it did take the compressed path
    # what goes over the wire: int8 payloads in all-to-all/all-gather; bf16 all-reduces
    assert any("s8[" in ln for ln in int8_hlo.splitlines() if "all-to-all" in ln)
    assert any("s8[" in ln for ln in int8_hlo.splitlines() if "all-gather" in ln)
    # bf16: the program asks for bf16 all-reduces (XLA's CPU backend then widens them to fp32,
    # which it reduces natively; NCCL and TPUs reduce bf16 as is)
    # (the fp32 model has no other bf16 region ops: these are the gradient all-reduces)
    assert len(re.findall(r"\}\) : \(tensor<[0-9x]+xbf16>\) -> tensor<[0-9x]+xbf16>", bf16_hlo)) >= 9
    assert compress.bytes_per_element("fp32", N) / compress.bytes_per_element("int8", N) > 3.9


def _run(tmp, *extra):
    base = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "model.d_ff=64", "train.batch_size=8", "train.seq_len=32", "train.eval_every=0", "train.log_every=1",
            "train.progress=false", "checkpoint.async_save=false", "checkpoint.every=3", "optim.lr=1e-2",
            "optim.warmup_steps=0", "optim.decay_steps=6", "mesh.preset=dp", "mesh.data=4", "mesh.fsdp=1",
            "mesh.devices=4", f"train.run_dir={tmp}"]
    return jaxllm.train(jaxllm.load_config(None, base + list(extra)))


@pytest.mark.slow
def test_the_config_key_trains_compressed_and_int8_error_feedback_resumes_exactly(tmp_path):
    ref = _run(tmp_path / "fp32", "train.steps=6")
    full = _run(tmp_path / "full", "train.steps=6", "optim.grad_compression=int8")
    losses = lambda s: np.array([h["loss"] for h in s["history"]])   # noqa: E731
    np.testing.assert_allclose(losses(full), losses(ref), rtol=3e-2)
    assert not np.array_equal(losses(full), losses(ref))       # the compressed path ran
    err = jax.tree.leaves(full["state"].opt_state[1])           # (data, *param) residuals, non-zero
    assert err[0].shape[0] == 4 and any(float(jnp.max(jnp.abs(e))) > 0 for e in err)
    _run(tmp_path / "cut", "train.steps=3", "optim.grad_compression=int8")
    resumed = _run(tmp_path / "cut", "train.steps=6", "optim.grad_compression=int8")
    assert resumed["resumed_from"] == 3
    # the error feedback came back from the checkpoint: steps 4-6 and the final state are the
    # uninterrupted run's (zeros instead would change them)
    np.testing.assert_array_equal(losses(resumed), losses(full)[3:])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
                 jax.device_get(full["state"].params))
    with pytest.raises(jaxllm.ConfigError, match="checkpoint has 4, this mesh data=2; resume on data=4"):
        _run(tmp_path / "cut", "train.steps=9", "optim.grad_compression=int8", "mesh.data=2", "mesh.devices=2")


def test_the_config_key_refuses_meshes_it_cannot_compress_over(tmp_path):
    with pytest.raises(jaxllm.ConfigError, match=r"data-parallel mesh .*'fsdp': 2"):
        _run(tmp_path / "a", "train.steps=1", "optim.grad_compression=bf16", "mesh.data=2", "mesh.fsdp=2")
    with pytest.raises(jaxllm.ConfigError, match="data >= 2"):
        _run(tmp_path / "b", "train.steps=1", "optim.grad_compression=int8", "mesh.data=1", "mesh.devices=1")
    with pytest.raises(jaxllm.ConfigError, match="does not combine with optim.offload_state"):
        _run(tmp_path / "c", "train.steps=1", "optim.grad_compression=int8", "optim.offload_state=true")
