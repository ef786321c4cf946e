"""The one attention entry point: causal/bidirectional, GQA, packed segments, KV cache, kernels.

Queries and keys may have different lengths (decoding reads a cache of S slots with T new
queries). Which key a query may see is decided by two integer arrays per side:

  *_segment_ids  (B, T) / (B, S): a query sees only keys of its own segment; 0 marks padding
                 (padding queries see padding keys, so their softmax stays finite; their
                 outputs are never read by a loss).
  *_positions    (B, T) / (B, S): the order for causality, i.e. the index of each token in
                 its sequence (or its cache slot): causal means kv_position <= q_position.
                 These are NOT the RoPE positions (those may restart per document).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model import cpu_gemm
from jaxllm.model.blockwise import blockwise_attention


def attention_mask(q_positions: jax.Array, kv_positions: jax.Array,
                   q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   causal: bool) -> jax.Array | None:
    """(B, 1, T, S) boolean: which keys each query may attend to (None: all of them)."""
    mask = None
    if causal:
        mask = (kv_positions[:, None, None, :] <= q_positions[:, None, :, None])
    if q_segment_ids is not None:
        same = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        mask = same if mask is None else mask & same
    return mask


def attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, *,
              q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
              causal: bool = True, implementation: str = "xla", block: int = 512,
              dot_dtype=jnp.float32, matmul: str = "xla") -> jax.Array:
    """Scaled dot-product attention; q has N heads, k/v have K heads with N % K == 0.

    Positions default to 0..T-1 and 0..S-1, so with T == S and no segments this is plain
    causal (or bidirectional) attention. Segment ids: both or neither.
    `implementation` "xla" runs everywhere; "cudnn" (fused flash attention, NVIDIA GPUs) is
    used where it applies (equal lengths, no segments, no cache) and XLA otherwise;
    "blockwise" (model/blockwise.py: flash attention in plain JAX, `block` queries x `block`
    keys at a time) keeps memory linear in the sequence length on every backend.
    Softmax runs in fp32 whatever the compute dtype. `dot_dtype` is what the two matmuls
    write (model.dot_output): fp32, or the compute dtype (bf16 scores, upcast for the softmax).
    `matmul` "blas" (model.matmul, fp32 on CPU) runs either implementation as one fused CPU
    kernel, forward and backward (model/cpu_gemm.py: flash attention around OpenBLAS sgemms).
    """
    b, t, n, h = q_btnh.shape
    s, k = k_bskh.shape[1], k_bskh.shape[2]
    assert n % k == 0, (n, k)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: give both q_segment_ids and kv_segment_ids, or neither")
    plain = q_positions is None and kv_positions is None and q_segment_ids is None and t == s
    if implementation == "cudnn" and plain:
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, is_causal=causal,
                                            implementation="cudnn")
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    # Group query heads per kv head, (B, T, K, G, H), so GQA needs no repeat of k/v in memory.
    g = n // k
    qg = q_btnh.reshape(b, t, k, g, h)
    if matmul == "blas":   # xla and blockwise alike: one fused CPU kernel (kernels/cpu_attention.cc)
        if q_segment_ids is None:
            q_segment_ids, kv_segment_ids = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
        out = cpu_gemm.fused_attention(qg, k_bskh, v_bskh, (q_positions, kv_positions, q_segment_ids,
                                                            kv_segment_ids), causal)
        return out.reshape(b, t, n, h).astype(q_btnh.dtype)
    if implementation == "blockwise":
        out = blockwise_attention(qg, k_bskh, v_bskh, q_positions, kv_positions, q_segment_ids,
                                  kv_segment_ids, causal, block, block, dot_dtype)
        return out.reshape(b, t, n, h).astype(q_btnh.dtype)
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_bskh,
                        preferred_element_type=dot_dtype).astype(jnp.float32) * (h ** -0.5)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh, preferred_element_type=dot_dtype)
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)
