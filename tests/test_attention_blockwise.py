"""Blockwise (flash) attention equals the reference attention — values and gradients, causal
and bidirectional, packed segments, GQA, ragged block edges, cache reads — and its compiled
memory grows linearly with the sequence length where the reference grows quadratically."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import ModelConfig
from jaxllm.model.attention import attention
from jaxllm.objectives import make_clm_loss


def _qkv(b, t, s, n, k, h, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, t, n, h), dtype), jax.random.normal(kk, (b, s, k, h), dtype),
            jax.random.normal(kv, (b, s, k, h), dtype))


def _value_and_grads(impl, q, k, v, weight_bt, **kw):
    def loss(q, k, v):
        out = attention(q, k, v, implementation=impl, block=8, **kw)
        # a non-linear read of the output, so every gradient path is exercised
        return jnp.sum(jnp.sin(out.astype(jnp.float32)) * weight_bt[:, :, None, None]), out
    (val, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return val, out * weight_bt[:, :, None, None], grads


@pytest.mark.parametrize("causal,packed,heads", [
    (True, False, (4, 2)), (True, True, (4, 2)), (False, False, (4, 2)), (False, True, (4, 2)),
    (True, True, (4, 4)), (True, True, (4, 1))])       # GQA, MHA, MQA
def test_blockwise_equals_reference_values_and_gradients(causal, packed, heads):
    b, t, h = 2, 37, 8                     # 37: the last block of 8 is ragged
    n, k = heads
    q, kk, vv = _qkv(b, t, t, n, k, h)
    seg = jnp.array([[1] * 10 + [2] * 20 + [0] * 7, [3] * 37]) if packed else None
    weight = (seg > 0).astype(jnp.float32) if packed else jnp.ones((b, t))
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
    ref = _value_and_grads("xla", q, kk, vv, weight, **kw)
    new = _value_and_grads("blockwise", q, kk, vv, weight, **kw)
    np.testing.assert_allclose(new[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(new[1], ref[1], atol=2e-6)
    for g_new, g_ref in zip(new[2], ref[2]):
        np.testing.assert_allclose(g_new, g_ref, atol=1e-5)


def test_blockwise_reads_a_cache_like_the_reference():
    # 3 new queries at slots 9..11 of a 20-slot cache of which slots 12.. are empty (segment 0)
    b, s, n, k, h = 2, 20, 4, 2, 8
    q, kk, vv = _qkv(b, 3, s, n, k, h, seed=1)
    q_pos = jnp.broadcast_to(jnp.arange(9, 12), (b, 3))
    kv_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    q_seg = jnp.ones((b, 3), jnp.int32)
    kv_seg = jnp.broadcast_to((jnp.arange(s) < 12).astype(jnp.int32), (b, s))
    kw = dict(q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    ref = jax.jit(lambda *a: attention(*a, **kw))(q, kk, vv)
    new = jax.jit(lambda *a: attention(*a, implementation="blockwise", block=8, **kw))(q, kk, vv)
    np.testing.assert_allclose(new, ref, atol=2e-6)


def test_blockwise_bf16_stays_close_to_the_reference():
    q, kk, vv = _qkv(2, 40, 40, 4, 2, 16, seed=2, dtype=jnp.bfloat16)
    ref = jax.jit(attention)(q, kk, vv).astype(jnp.float32)
    new = jax.jit(lambda *a: attention(*a, implementation="blockwise", block=16))(q, kk, vv)
    new = new.astype(jnp.float32)
    assert new.dtype == ref.dtype
    np.testing.assert_allclose(new, ref, atol=0.02 * float(jnp.max(jnp.abs(ref))))


def test_the_model_trains_and_decodes_the_same_with_blockwise_attention():
    base = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    blockwise = dataclasses.replace(base, attention="blockwise", attention_block=8)
    params = jaxllm.init_params(base, jax.random.key(0))
    b, t = 2, 24
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, base.vocab_size)
    seg = jnp.array([[1] * 9 + [2] * 15, [1] * 20 + [0] * 4])
    pos = jnp.array([list(range(9)) + list(range(15)), list(range(20)) + [0] * 4])
    batch = {"tokens": tokens, "positions": pos, "segment_ids": seg, "loss_mask": (seg > 0).astype(jnp.int32)}

    def grads(cfg):
        return jax.jit(jax.value_and_grad(lambda p: make_clm_loss(cfg)(p, batch, None)[0]))(params)
    (l_ref, g_ref), (l_new, g_new) = grads(base), grads(blockwise)
    np.testing.assert_allclose(l_new, l_ref, rtol=1e-6)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=2e-6), g_new, g_ref)

    # prefill 10 then decode 2 through the KV cache: the logits of the full forward
    full = jax.jit(lambda p, x: jaxllm.forward(p, x, base))(params, tokens)

    @jax.jit
    def step(params, x, cache, positions):
        hid, cache = jaxllm.trunk(params, x, blockwise, cache=cache, positions=positions)
        return jaxllm.unembed(params, hid, blockwise), cache
    logits, cache = step(params, tokens[:, :10], jaxllm.init_cache(blockwise, b, 16),
                         jnp.broadcast_to(jnp.arange(10), (b, 10)))
    outs = [logits]
    for i in (10, 11):
        logits, cache = step(params, tokens[:, i:i + 1], cache, jnp.full((b, 1), i))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full[:, :12], atol=1e-5)


def _attention_grad_temp_bytes(impl, t):
    """Compiled temporary memory of value-and-grad of one attention call (compile only)."""
    b, n, k, h = 1, 4, 2, 32
    spec = [jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)] + \
        [jax.ShapeDtypeStruct((b, t, k, h), jnp.float32)] * 2

    def loss(q, kk, vv):
        return jnp.sum(attention(q, kk, vv, implementation=impl, block=256) ** 2)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fn.lower(*spec).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_with_the_sequence():
    short = {impl: _attention_grad_temp_bytes(impl, 1024) for impl in ("xla", "blockwise")}
    long = {impl: _attention_grad_temp_bytes(impl, 4096) for impl in ("xla", "blockwise")}
    growth = {impl: long[impl] / short[impl] for impl in short}
    print({impl: f"{short[impl] / 2**20:.1f} -> {long[impl] / 2**20:.1f} MiB" for impl in short})
    assert growth["xla"] > 12          # 4x the length: ~16x the scores
    assert growth["blockwise"] < 5     # ~4x: linear
    assert long["blockwise"] * 8 < long["xla"]
