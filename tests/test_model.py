"""The model as pure functions: shapes, causality, packing, GQA, remat and dtype options."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import ModelConfig

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.fixture(scope="module")
def params():
    return jaxllm.init_params(CFG, jax.random.key(0))


def tokens(b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def test_forward_shapes_and_dtype(params):
    logits = jaxllm.forward(params, tokens(3, 11), CFG)
    chex.assert_shape(logits, (3, 11, CFG.vocab_size))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)


def test_params_carry_logical_axis_names():
    specs = jaxllm.param_logical_axes(CFG)
    shapes = jax.eval_shape(lambda: jaxllm.init_params(CFG, jax.random.key(0)))
    for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape) and all(n is not None for n in spec), (spec, shape)
    assert specs["layers"]["attn"]["q"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "head_dim")


def test_causality_future_tokens_never_change_past_logits(params):
    t = 16
    x = tokens(2, t)
    base = jaxllm.forward(params, x, CFG)
    for cut in (0, 5, 12):
        y = x.at[:, cut + 1:].set((x[:, cut + 1:] + 7) % CFG.vocab_size)
        out = jaxllm.forward(params, y, CFG)
        np.testing.assert_allclose(out[:, :cut + 1], base[:, :cut + 1], atol=1e-6)
        assert not np.allclose(out[:, cut + 1:], base[:, cut + 1:], atol=1e-3)


def test_bidirectional_path_sees_the_future(params):
    x = tokens(1, 8)
    y = x.at[:, -1].set((x[:, -1] + 1) % CFG.vocab_size)
    a = jaxllm.forward(params, x, CFG, causal=False)
    b = jaxllm.forward(params, y, CFG, causal=False)
    assert not np.allclose(a[:, 0], b[:, 0], atol=1e-5)


def test_packed_document_logits_equal_the_document_alone(params):
    doc_a, doc_b, doc_c = tokens(1, 5, 1), tokens(1, 9, 2), tokens(1, 4, 3)
    packed = jnp.concatenate([doc_a, doc_b, doc_c, jnp.zeros((1, 2), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 9 + [3] * 4 + [0, 0]])
    out = jaxllm.forward(params, packed, CFG, segment_ids=seg)  # positions derived per segment
    for doc, lo in ((doc_a, 0), (doc_b, 5), (doc_c, 14)):
        alone = jaxllm.forward(params, doc, CFG)
        np.testing.assert_allclose(out[:, lo:lo + doc.shape[1]], alone, atol=2e-5)


def test_positions_drive_rope(params):
    x = tokens(1, 6)
    a = jaxllm.forward(params, x, CFG)
    gapped = jnp.array([[0, 3, 6, 9, 12, 15]])
    b = jaxllm.forward(params, x, CFG, positions=gapped)
    assert not np.allclose(a[:, 1:], b[:, 1:], atol=1e-4)
    # a constant shift leaves relative positions unchanged, so logits are the same
    c = jaxllm.forward(params, x, CFG, positions=jnp.arange(6)[None] + 100)
    np.testing.assert_allclose(a, c, atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads(params):
    mha = dataclasses.replace(CFG, n_kv_heads=CFG.n_heads)
    g = CFG.n_heads // CFG.n_kv_heads
    p = jax.tree.map(lambda x: x, params)
    attn = dict(p["layers"]["attn"])
    for name in ("k", "v"):
        attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], g, axis=2)}
    p = dict(p, layers=dict(p["layers"], attn=attn))
    x = tokens(2, 7)
    np.testing.assert_allclose(jaxllm.forward(p, x, mha), jaxllm.forward(params, x, CFG), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_memory_not_gradients(params, policy):
    x = tokens(2, 8)

    def loss(p, cfg):
        return jnp.mean(jaxllm.forward(p, x, cfg) ** 2)
    g0 = jax.grad(loss)(params, CFG)
    g1 = jax.grad(loss)(params, dataclasses.replace(CFG, remat=policy))
    chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)


def test_bf16_compute_stays_close_to_fp32(params):
    x = tokens(2, 8)
    a = jaxllm.forward(params, x, CFG)
    b = jaxllm.forward(params, x, dataclasses.replace(CFG, compute_dtype="bfloat16"))
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b))) < 0.05 * float(jnp.max(jnp.abs(a)))


def test_qkv_bias_and_tied_embeddings_change_the_parameter_tree():
    cfg = dataclasses.replace(CFG, qkv_bias=True, tie_embeddings=True)
    p = jaxllm.init_params(cfg, jax.random.key(0))
    assert "lm_head" not in p and "bias" in p["layers"]["attn"]["q"]
    chex.assert_shape(p["layers"]["attn"]["k"]["bias"], (CFG.n_layers, CFG.n_kv_heads, CFG.dim_per_head))


def test_init_is_deterministic():
    a = jaxllm.init_params(CFG, jax.random.key(3))
    b = jaxllm.init_params(CFG, jax.random.key(3))
    chex.assert_trees_all_equal(a, b)


def test_mixed_matmul_gradients():
    from jaxllm.model.matmul import mixed_matmul
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 5, 8))
    w = jax.random.normal(kw, (8, 3, 4))

    def ref(x, w):
        return jnp.sum(jnp.sin(jnp.einsum("...a,abc->...bc", x, w)))

    def ours(x, w):
        return jnp.sum(jnp.sin(mixed_matmul(x, w, 1)))
    gx, gw = jax.grad(ours, (0, 1))(x, w)
    rx, rw = jax.grad(ref, (0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6)   # fp32: exactly autodiff
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-6)
    bx, bw = jax.grad(ours, (0, 1))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert bx.dtype == jnp.bfloat16 and bw.dtype == jnp.bfloat16
    np.testing.assert_allclose(bx.astype(jnp.float32), rx, atol=0.1 * float(jnp.max(jnp.abs(rx))))
    np.testing.assert_allclose(bw.astype(jnp.float32), rw, atol=0.1 * float(jnp.max(jnp.abs(rw))))
