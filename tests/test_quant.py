"""QLoRA: a quantized frozen base (int8 / NF4 codes, absmax per block) dequantized per matmul.

The quantizer is checked against its own error bounds; the model on a quantized base is checked
to be exactly the model on the dequantized kernels (so LoRA over it trains the function it says);
the one step trains a delta over it on a sharded mesh as on one device."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import LoraConfig, MeshConfig, ModelConfig, OptimConfig
from jaxllm.configlib import ConfigError
from jaxllm.data.tokens import synthetic_row
from jaxllm.model import lora, quant
from jaxllm.model.api import param_logical_axes, param_shapes
from jaxllm.objectives import make_clm_loss
from jaxllm.parallel import rules as R
from jaxllm.training.optim import make_optimizer
from jaxllm.training.setup import make_state, plan_state
from jaxllm.training.step import make_train_step

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
LCFG = LoraConfig(r=4, alpha=8.0)
LEVELS = np.asarray(quant.NF4_LEVELS, np.float32)


def kernel(shape=(3, 128, 4, 16), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def blockwise_absmax(w, axis, b):
    x = np.asarray(w).reshape(w.shape[:axis] + (w.shape[axis] // b, b) + w.shape[axis + 1:])
    return np.abs(x).max(axis=axis + 1, keepdims=True)


def per_element(absmax, w, axis, b):
    """A per-block value broadcast back to w's elements."""
    return np.broadcast_to(absmax, absmax.shape[:axis + 1] + (b,) + absmax.shape[axis + 2:]).reshape(w.shape)


# ---------------------------------------------------------------------------- the quantizer
@pytest.mark.parametrize("kind", quant.KINDS)
def test_round_trip_error_is_within_half_a_quantization_step(kind):
    w = kernel()                                         # (L, in=128, out=(4, 16)): n_out=2
    q = quant.quantize(w, kind, n_out=2, block=64)
    assert q.shape == w.shape and q.axis == 1
    assert q.scale.shape == (3, 2, 4, 16)                # two blocks of 64 along the input dim
    assert q.codes.shape == ((3, 128, 4, 16) if kind == "int8" else (3, 64, 4, 16))
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    absmax = per_element(blockwise_absmax(w, 1, 64), w, 1, 64)
    # int8: a step is absmax / 127; nf4: the widest gap between NF4 levels (0.72 -> 1.0), times absmax
    half_step = absmax / 127 / 2 if kind == "int8" else absmax * np.max(np.diff(LEVELS)) / 2
    assert np.all(err <= half_step * (1 + 1e-5) + 1e-7), float((err / half_step).max())
    # each block's absmax element is a level (+-1 * absmax): reconstructed to fp32 rounding
    at_max = np.abs(np.asarray(w)) == absmax
    np.testing.assert_allclose(np.asarray(q.dequantize())[at_max], np.asarray(w)[at_max], rtol=1e-6)
    mean_rel = err.mean() / np.abs(np.asarray(w)).mean()
    assert mean_rel < (0.01 if kind == "int8" else 0.12), mean_rel


def test_nf4_codes_pack_two_per_byte_in_order():
    """Values that ARE NF4 levels come back bit for bit: a swapped nibble or a mis-interleaved
    pair would move them. Every block's absmax is 1 (its first row holds +-1)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, size=(2, 64, 3))           # (L, in, out)
    idx[:, 0, :] = 15                                    # level 1.0: absmax of each block is 1
    w = jnp.asarray(LEVELS[idx])
    q = quant.quantize(w, "nf4", n_out=1, block=64)
    np.testing.assert_array_equal(np.asarray(q.codes) & 0xF, idx[:, 0::2, :])
    np.testing.assert_array_equal(np.asarray(q.codes) >> 4, idx[:, 1::2, :])
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(w))


def test_blocks_shrink_to_a_dim_that_is_not_a_multiple_and_zero_blocks_stay_zero():
    w = kernel((2, 4, 16, 8)).at[:, :, :8].set(0.0)      # o-style kernel: in (n=4, h=16) -> out 8
    q = quant.quantize(w, "nf4", n_out=1, block=64)      # h=16 < 64: one block of 16 per (layer, head, out)
    assert q.axis == 2 and q.scale.shape == (2, 4, 1, 8)
    assert quant.block_sizes({"layers": {"attn": {"o": {"kernel": q}}}}) == {"layers/attn/o/kernel": 16}
    d = np.asarray(q.dequantize())
    assert np.all(np.isfinite(d)) and np.all(d[:, :, :8] == 0)
    with pytest.raises(ValueError, match="odd"):
        quant.quantize(kernel((2, 7, 4)), "nf4", n_out=1)


def test_nf4_base_is_about_a_seventh_of_fp32():
    base = param_shapes(CFG)
    qshapes = jax.eval_shape(lambda p: quant.quantize_tree(p, "nf4", 64), base)
    q = qshapes["layers"]["mlp"]["up"]["kernel"]
    n = math.prod(base["layers"]["mlp"]["up"]["kernel"].shape)
    assert quant.tree_nbytes(q) == n // 2 + 4 * n // 64  # 0.5 byte a code + an fp32 scale per 64
    assert quant.tree_nbytes(qshapes["embed"]) == quant.tree_nbytes(base["embed"])   # not quantized


# ---------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def base():
    return jax.jit(jaxllm.init_params, static_argnums=0)(CFG, jax.random.key(0))


@pytest.mark.parametrize("kind", quant.KINDS)
def test_the_model_on_a_quantized_base_is_the_model_on_its_dequantized_kernels(base, kind):
    qbase = quant.quantize_tree(base, kind, 64)
    delta = lora.init_delta(base, LCFG, jax.random.key(1))
    delta = jax.tree.map(lambda x: x + 0.05, delta)      # B != 0: the delta matters
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    fwd = jax.jit(jaxllm.forward, static_argnums=2)
    got = fwd(lora.attach(qbase, delta, LCFG), tokens, CFG)
    want = fwd(lora.attach(quant.dequantize_tree(qbase), delta, LCFG), tokens, CFG)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and it is close to the unquantized model (the quantization error, not a broken layout)
    full = np.asarray(fwd(lora.attach(base, delta, LCFG), tokens, CFG))
    rel = np.abs(np.asarray(got) - full).mean() / np.abs(full).mean()
    assert rel < (0.01 if kind == "int8" else 0.1), rel
    # merge folds the dequantized kernels: the merged plain model is the same function
    merged = lora.merge(qbase, delta, LCFG)
    np.testing.assert_allclose(np.asarray(fwd(merged, tokens, CFG)), np.asarray(got), atol=1e-5)


# ---------------------------------------------------------------------------- the step
def train_qlora(mesh_shape, steps=3):
    devices = jax.devices()[:math.prod(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = R.logical_rules(MeshConfig(preset="fsdp_tp"))
    base = jax.jit(jaxllm.init_params, static_argnums=0)(CFG, jax.random.key(0))
    qbase = quant.quantize_tree(base, "nf4", 64)
    qshapes = jax.eval_shape(lambda p: p, qbase)
    rows = [[synthetic_row(0, i * 8 + j, 32, CFG.vocab_size) for j in range(8)] for i in range(steps)]
    batches = [{k: np.stack([r[k] for r in rs]) for k in rs[0]} for rs in rows]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), steps)
        init_fn = lambda k: lora.init_delta(param_shapes(CFG), LCFG, k)   # noqa: E731
        _, shardings = plan_state(init_fn, lora.delta_logical_axes(CFG, LCFG), optimizer, rules, mesh,
                                  frozen_specs=quant.logical_axes(param_logical_axes(CFG), qshapes),
                                  frozen_shapes=qshapes)
        state = make_state(init_fn, optimizer, shardings, seed=0)
        frozen = jax.device_put(qbase, shardings.frozen)
        step = make_train_step(make_clm_loss(CFG), optimizer, shardings, merge=lora.make_merge(LCFG))
        losses = []
        for batch in batches:
            state, metrics = step(state, jax.device_put(batch, shardings.batch), frozen)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), frozen, qbase


def test_qlora_step_trains_the_delta_over_a_sharded_nf4_base_as_on_one_device():
    assert len(jax.devices()) == 8, "conftest must give 8 CPU devices"
    losses1, delta1, frozen1, qbase = train_qlora((1, 1, 1))
    losses8, delta8, frozen8, _ = train_qlora((2, 2, 2))
    assert all(np.isfinite(losses1)) and losses1[-1] < losses1[0]
    chex.assert_trees_all_equal(jax.device_get(frozen1), qbase)     # the codes are never touched
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(delta8), jax.tree.leaves(delta1)):
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 5e-5 * np.linalg.norm(np.asarray(b))
    q = frozen8["layers"]["attn"]["q"]["kernel"]                     # codes shard like the kernel
    assert q.codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.scale.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)


def test_quantize_base_needs_lora_and_is_refused_by_the_reward_recipe():
    with pytest.raises(ConfigError, match="set lora.r > 0"):
        jaxllm.load_config(None, ["lora.quantize_base=nf4"])
    with pytest.raises(ConfigError, match="the reward recipe does not quantize"):
        jaxllm.load_config(None, ["lora.quantize_base=int8", "lora.r=4", "train.objective=reward"])
    with pytest.raises(ConfigError, match="quantize_block is set but the base is not quantized"):
        jaxllm.load_config(None, ["lora.r=4", "lora.quantize_block=32"])
    with pytest.raises(ConfigError, match="quantize_block must be >= 1"):
        jaxllm.load_config(None, ["lora.quantize_block=0"])
    from jaxllm.training.pretrain import frozen_layout
    cfg = jaxllm.load_config(None, ["model=tiny", "model.d_ff=191", "lora.r=4", "lora.quantize_base=nf4"])
    with pytest.raises(ConfigError, match="nf4 packs two codes per byte.*191"):
        frozen_layout(cfg, param_logical_axes(cfg.model), param_shapes(cfg.model))
