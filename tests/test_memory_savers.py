"""The seed's memory savers, each through the one step: optimizer state offloaded to host memory
between steps, and the remat policy that offloads saved activations. On CPU host and device
memory are the same RAM, so these tests check that the paths run, put the arrays where they
say, and compute exactly what the plain step computes."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import MeshConfig, ModelConfig, OptimConfig
from jaxllm.data.tokens import synthetic_batches
from jaxllm.objectives import make_clm_loss
from jaxllm.parallel import rules as R
from jaxllm.training.optim import make_optimizer
from jaxllm.training.setup import make_state, plan_state
from jaxllm.training.step import make_train_step

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _train(offload: bool, steps: int = 4):
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = R.logical_rules(MeshConfig())
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), steps)
    init = lambda key: jaxllm.init_params(CFG, key)   # noqa: E731
    batches = synthetic_batches(seq_len=16, global_batch_size=4, vocab_size=CFG.vocab_size, seed=0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, sh = plan_state(init, jaxllm.param_logical_axes(CFG), opt, rules, mesh,
                           offload_opt_state=offload)
        state = make_state(init, opt, sh, seed=0)
        step = make_train_step(make_clm_loss(CFG), opt, sh)
        losses = []
        for _ in range(steps):
            state, m = step(state, jax.device_put(next(batches), sh.batch), None)
            losses.append(float(m["loss"]))
    return state, losses


def test_optimizer_state_offloaded_to_host_trains_exactly_like_on_device():
    plain, plain_losses = _train(offload=False)
    off, off_losses = _train(offload=True)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(off.opt_state)}
    assert kinds == {"pinned_host"}, kinds                   # between steps: in host memory
    assert {x.sharding.memory_kind for x in jax.tree.leaves(off.params)} == {"device"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(plain.opt_state)} == {"device"}
    assert off_losses == plain_losses
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b)))
    assert plain_losses[-1] < plain_losses[0]                # it did train


def test_offload_remat_policy_moves_saved_activations_to_host_and_keeps_the_gradients():
    params = jaxllm.init_params(CFG, jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)

    def grad_fn(cfg):
        return jax.grad(lambda p: jnp.mean(jaxllm.forward(p, x, cfg) ** 2))
    offload = dataclasses.replace(CFG, remat="offload")
    jaxpr = str(jax.make_jaxpr(grad_fn(offload))(params))
    assert "MemorySpace.Host" in jaxpr and "MemorySpace.Device" in jaxpr   # out, then back in
    assert "MemorySpace.Host" not in str(jax.make_jaxpr(grad_fn(CFG))(params))
    g_plain = jax.jit(grad_fn(CFG))(params)
    g_off = jax.jit(grad_fn(offload))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_off, g_plain)


def test_offload_needs_host_memory():
    from jaxllm.configlib import ConfigError
    from jaxllm.training.setup import check_host_offload

    class FakeDevice:
        platform = "tpu"

        def addressable_memories(self):
            return [type("M", (), {"kind": "device"})()]

    class FakeMesh:
        devices = np.array([FakeDevice()])
    with pytest.raises(ConfigError, match="offload_state=true needs host memory"):
        check_host_offload(FakeMesh())


@pytest.mark.slow
def test_a_run_with_offloaded_optimizer_state_checkpoints_and_resumes_exactly(tmp_path):
    """Through the whole run: orbax saves the host-memory state, the resume puts it back in host
    memory, and the losses are those of an uninterrupted on-device run."""
    args = ["model=tiny", "train.batch_size=8", "train.seq_len=64", "train.log_every=1",
            "train.eval_every=0", "train.progress=false", "optim.warmup_steps=2", "mesh.devices=1",
            "checkpoint.async_save=false", "optim.decay_steps=6", "checkpoint.every=2"]

    def run(d, *o):
        return jaxllm.train(jaxllm.load_config(None, args + [f"train.run_dir={tmp_path / d}", *o]))
    plain = [h["loss"] for h in run("plain", "train.steps=6")["history"]]
    first = run("off", "train.steps=3", "optim.offload_state=true")
    second = run("off", "train.steps=6", "optim.offload_state=true")
    assert second["resumed_from"] == 3
    assert [h["loss"] for h in first["history"] + second["history"]] == plain
