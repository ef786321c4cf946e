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


def _grad_temp_bytes(cfg, x):
    f = jax.jit(jax.grad(lambda p: jnp.mean(jaxllm.forward(p, x, cfg) ** 2)))
    p = jax.eval_shape(lambda: jaxllm.init_params(cfg, jax.random.key(0)))
    return f.lower(p).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "offload"])
def test_remat_policies_change_memory_not_gradients(params, policy):
    x = tokens(2, 8)

    def loss(p, cfg):
        return jnp.mean(jaxllm.forward(p, x, cfg) ** 2)
    g0 = jax.grad(loss)(params, CFG)
    g1 = jax.grad(loss)(params, dataclasses.replace(CFG, remat=policy))
    chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)
    # compiled memory: what the backward keeps per layer shrinks (deep, narrow vocab, so saved
    # activations dominate the step's temporaries). Not long rows: "dots" saves the attention
    # matrices (batched dots), so at T=256 on d_model 64 it kept 0.90x of no-remat on jax 0.12.1
    # (0.62x on 0.12.0.1). At (16, 64), dots / none = 0.51-0.57 and full / none = 0.19-0.21 on
    # jax 0.10.2, 0.12.0.1 and 0.12.1.
    deep = dataclasses.replace(CFG, n_layers=6, vocab_size=32)
    xl = jax.random.randint(jax.random.key(0), (16, 64), 0, 32)
    none, remat = _grad_temp_bytes(deep, xl), _grad_temp_bytes(dataclasses.replace(deep, remat=policy), xl)
    assert remat < 0.8 * none, (policy, remat, none)
    if policy in ("dots", "dots_no_batch"):
        # they keep the projections (custom VJPs, matched by name): more than full remat keeps
        full = _grad_temp_bytes(dataclasses.replace(deep, remat="full"), xl)
        assert remat > 1.1 * full, (policy, remat, full)


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


# ----------------------------------------------------------------- trunk, heads, attention, cache
def test_trunk_then_unembed_is_forward_and_heads_share_one_pass(params):
    x = tokens(2, 9)
    hidden, cache = jaxllm.trunk(params, x, CFG)
    assert cache is None
    chex.assert_shape(hidden, (2, 9, CFG.d_model))
    np.testing.assert_array_equal(jaxllm.unembed(params, hidden, CFG), jaxllm.forward(params, x, CFG))


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_chunked_token_stats_equal_unchunked_values_and_gradients(tie):
    from jaxllm.model.heads import token_stats
    from jaxllm.objectives.clm import masked_cross_entropy
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    p = jaxllm.init_params(cfg, jax.random.key(1))
    x, y = tokens(3, 13, 1), tokens(3, 13, 2)
    w = (jax.random.uniform(jax.random.key(3), (3, 13)) < 0.7).astype(jnp.float32)

    def loss(p, chunk):
        h, _ = jaxllm.trunk(p, x, cfg)
        st = token_stats(p, h, y, cfg, chunk=chunk, entropy=True)
        return -jnp.sum(st["logprob"] * w) + 1e-3 * jnp.sum(st["lse"] ** 2 * w) + jnp.sum(st["entropy"] * w)

    def reference(p):   # full logits, the textbook formulas
        logits = jaxllm.forward(p, x, cfg)
        nll, z, _ = masked_cross_entropy(logits, y, w, z_loss=1e-3)
        prob = jax.nn.softmax(logits)
        ent = -jnp.sum(prob * jax.nn.log_softmax(logits), -1)
        return nll + z + jnp.sum(ent * w)
    ref_v, ref_g = jax.value_and_grad(reference)(p)
    for chunk in (0, 4, 5, 13):   # 13 positions: chunks of 4 and 5 need padding
        v, g = jax.value_and_grad(loss)(p, chunk)
        np.testing.assert_allclose(v, ref_v, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_token_stats_temperature_divides_logits(params):
    from jaxllm.model.heads import token_stats
    x = tokens(2, 8)
    h, _ = jaxllm.trunk(params, x, CFG)
    st = token_stats(params, h, x, CFG, temperature=0.7)
    ref = jax.nn.log_softmax(jaxllm.forward(params, x, CFG) / 0.7)
    np.testing.assert_allclose(st["logprob"], jnp.take_along_axis(ref, x[..., None], -1)[..., 0], atol=1e-5)


def test_token_stats_correct_is_an_argmax_hit(params):
    """`correct` (target logit >= max, heads.py) equals argmax == target on hits and misses."""
    from jaxllm.model.heads import token_stats
    x = tokens(2, 8)
    logits = jaxllm.forward(params, x, CFG)
    greedy = jnp.argmax(logits, -1)
    y = jnp.where(jnp.arange(8) % 2 == 0, greedy, (greedy + 1) % CFG.vocab_size)   # hit, miss, ...
    h, _ = jaxllm.trunk(params, x, CFG)
    for chunk in (0, 3):
        st = token_stats(params, h, y, CFG, chunk=chunk)
        np.testing.assert_array_equal(st["correct"], (greedy == y).astype(jnp.float32))
    assert 0 < float(jnp.mean(st["correct"])) < 1


def test_attention_with_fewer_queries_than_keys_matches_the_full_square():
    from jaxllm.model.attention import attention
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    b, s, n, k, h = 2, 10, 4, 2, 8
    q = jax.random.normal(kq, (b, s, n, h))
    kk_, vv = jax.random.normal(kk, (b, s, k, h)), jax.random.normal(kv, (b, s, k, h))
    full = attention(q, kk_, vv, causal=True)
    # the last 3 queries against all 10 keys: positions say where the queries sit
    tail = attention(q[:, 7:], kk_, vv, q_positions=jnp.broadcast_to(jnp.arange(7, 10), (b, 3)),
                     kv_positions=jnp.broadcast_to(jnp.arange(10), (b, 10)), causal=True)
    np.testing.assert_allclose(tail, full[:, 7:], atol=1e-6)
    # segment ids on both sides: a query never sees another segment's keys
    seg = jnp.array([[1] * 5 + [2] * 5] * b)
    packed = attention(q, kk_, vv, q_segment_ids=seg, kv_segment_ids=seg)
    alone = attention(q[:, 5:], kk_[:, 5:], vv[:, 5:])
    np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-6)
    with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
        attention(q, kk_, vv, q_segment_ids=seg)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_kv_cache_prefill_then_decode_equals_full_forward(params, compute):
    cfg = dataclasses.replace(CFG, compute_dtype=compute)
    x = tokens(2, 12, 5)
    full = jaxllm.forward(params, x, cfg)
    cache = jaxllm.init_cache(cfg, 2, 16)
    assert cache["k"].shape == (CFG.n_layers, 2, 16, CFG.n_kv_heads, CFG.dim_per_head)
    assert cache["k"].dtype == jnp.dtype(compute)
    h, cache = jaxllm.trunk(params, x[:, :8], cfg, cache=cache)          # prefill 8
    outs = [jaxllm.unembed(params, h, cfg)]
    for t in range(8, 12):                                               # decode 4, one at a time
        h, cache = jaxllm.trunk(params, x[:, t:t + 1], cfg, cache=cache,
                                positions=jnp.full((2, 1), t))
        outs.append(jaxllm.unembed(params, h, cfg))
    assert int(cache["index"]) == 12
    tol = 1e-5 if compute == "float32" else 0.05 * float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=tol)


def test_residual_projections_start_smaller():
    cfg = dataclasses.replace(CFG, n_layers=8, d_model=64, d_ff=256, init_std=0.02)
    p = jaxllm.init_params(cfg, jax.random.key(0))
    target = 0.02 / np.sqrt(2 * 8)
    for w in (p["layers"]["attn"]["o"]["kernel"], p["layers"]["mlp"]["down"]["kernel"]):
        np.testing.assert_allclose(float(jnp.std(w)), target, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(p["layers"]["attn"]["q"]["kernel"])), 0.02, rtol=0.05)
    off = jaxllm.init_params(dataclasses.replace(cfg, scale_residual_init=False), jax.random.key(0))
    np.testing.assert_allclose(float(jnp.std(off["layers"]["mlp"]["down"]["kernel"])), 0.02, rtol=0.05)


@pytest.mark.slow
def test_eager_init_and_forward_equal_jitted(params):
    with jax.disable_jit():
        eager = jaxllm.init_params(CFG, jax.random.key(0))
        out = jaxllm.forward(eager, tokens(1, 6), CFG)
    chex.assert_trees_all_equal(eager, params)
    np.testing.assert_allclose(out, jax.jit(jaxllm.forward, static_argnums=2)(params, tokens(1, 6), CFG),
                               atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_equal_the_scan(params, remat):
    """model.scan_layers=false: the same params, logits, gradients and KV cache as the scan;
    its compiled step has no loop (each layer is its own code)."""
    x = tokens(2, 8, 3)
    scan = dataclasses.replace(CFG, remat=remat)
    loop = dataclasses.replace(scan, scan_layers=False)

    def loss(p, cfg):
        return jnp.mean(jaxllm.forward(p, x, cfg) ** 2)
    f_scan, f_loop = (jax.jit(jax.value_and_grad(loss), static_argnums=1) for _ in range(2))
    (l0, g0), (l1, g1) = f_scan(params, scan), f_loop(params, loop)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert "while" in f_scan.lower(params, scan).as_text()
    assert "while" not in f_loop.lower(params, loop).as_text()
    c0, c1 = jaxllm.init_cache(scan, 2, 8), jaxllm.init_cache(loop, 2, 8)
    h0, c0 = jax.jit(lambda p, c: jaxllm.trunk(p, x[:, :5], scan, cache=c))(params, c0)
    h1, c1 = jax.jit(lambda p, c: jaxllm.trunk(p, x[:, :5], loop, cache=c))(params, c1)
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(c1, c0, rtol=1e-5, atol=1e-6)
