"""Blockwise (flash) attention in plain JAX: memory linear in sequence length, on any backend.

The reference path in attention.py builds (B, heads, T, S) fp32 scores and, under autodiff,
keeps them (and the probabilities) for the backward pass: quadratic memory. Here queries and
keys are cut into blocks of `block_q` x `block_k`; the forward pass runs an online softmax over
key blocks (running max, running sum, running output), saving only the output and the
log-sum-exp per query. The backward pass (a custom VJP, FlashAttention-2's) recomputes each
block's probabilities from that log-sum-exp. The largest attention tensor is one block of
scores, (B, heads, block_q, block_k), and the mask is built per block from the positions and
segment ids, so nothing of size T x S ever exists.

A block pair whose mask is all False (above the causal diagonal, or between two packed
documents) is skipped under lax.cond, so causal attention does about half the work of the
full square.

Layouts: q (B, T, K, G, H) grouped per kv head (GQA without repeating k/v), k/v (B, S, K, H).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def _blocks(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Split `axis` into (n_blocks, size) and move n_blocks to the front (scan's axis)."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of _blocks for a stacked (n_blocks, ...) result whose block dim is at `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _block_mask(q_pos, kv_pos, q_seg, kv_seg, kv_valid, causal: bool):
    """(B, bq, bk) boolean for one block pair."""
    mask = kv_valid[:, None, :]
    if causal:
        mask = mask & (kv_pos[:, None, :] <= q_pos[:, :, None])
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    return mask


def _dot(spec, a, b, dot):
    """einsum with fp32 accumulation that writes `dot` (fp32 or the compute dtype,
    model.dot_output), returned as fp32 for the online softmax and the accumulators."""
    return jnp.einsum(spec, a, b, preferred_element_type=dot).astype(jnp.float32)


def _scores(q_blk, k_blk, scale, dot):
    """(B, bq, K, G, H) x (B, bk, K, H) -> (B, K, G, bq, bk) fp32."""
    return _dot("bqkgh,bskh->bkgqs", q_blk, k_blk, dot) * scale


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_valid, causal, bq, bk, dot):
    """Blocked q (nq, B, bq, K, G, H) etc. -> out (nq, B, bq, K, G, H) fp32, lse (nq, B, K, G, bq)."""
    scale = q.shape[-1] ** -0.5
    _, b, _, kh, g, h = q.shape

    def per_q_block(_, qi):
        q_blk, qp, qs = qi

        def per_k_block(carry, kj):
            k_blk, v_blk, kp, ks, kval = kj
            mask = _block_mask(qp, kp, qs, ks, kval, causal)

            def compute(carry):
                m, denom, acc = carry
                s = jnp.where(mask[:, None, None], _scores(q_blk, k_blk, scale, dot), -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)   # a row with no key yet
                p = jnp.exp(s - m_safe[..., None])                    # masked: exp(-inf) = 0
                corr = jnp.exp(m - m_safe)
                denom = denom * corr + p.sum(-1)
                pv = _dot("bkgqs,bskh->bkgqh", p.astype(v_blk.dtype), v_blk, dot)
                return m_new, denom, acc * corr[..., None] + pv

            return jax.lax.cond(mask.any(), compute, lambda c: c, carry), None

        init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
                jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, h), jnp.float32))
        (m, denom, acc), _ = jax.lax.scan(per_k_block, init, (k, v, kv_pos, kv_seg, kv_valid))
        seen = denom > 0                      # a query that sees no key at all outputs 0
        out = acc / jnp.where(seen, denom, 1.0)[..., None]
        lse = jnp.where(seen, jnp.where(jnp.isneginf(m), 0.0, m) + jnp.log(jnp.where(seen, denom, 1.0)),
                        jnp.inf)          # +inf: such a row's recomputed probabilities are 0
        return None, (jnp.einsum("bkgqh->bqkgh", out), lse)

    _, (out, lse) = jax.lax.scan(per_q_block, None, (q, q_pos, q_seg))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_valid, causal, bq, bk, dot):
    out, _ = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_valid, causal, bq, bk, dot)
    return out


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_valid, causal, bq, bk, dot):
    out, lse = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_valid, causal, bq, bk, dot)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_valid, out, lse)


def _flash_bwd(causal, bq, bk, dot, res, d_out):
    """FlashAttention-2's backward: per key block, accumulate dK, dV over query blocks; dQ is
    one array carried through and updated block by block."""
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_valid, out, lse = res
    scale = q.shape[-1] ** -0.5
    dt = q.dtype
    # D_i = rowsum(dO_i * O_i), the softmax-backward correction, (nq, B, K, G, bq)
    delta = jnp.einsum("nbqkgh,nbqkgh->nbkgq", d_out.astype(jnp.float32), out)
    d_out = d_out.astype(dt)

    def per_k_block(dq, kj):
        k_blk, v_blk, kp, ks, kval = kj

        def per_q_block(carry, qi):
            dq, dk, dv = carry
            i, q_blk, do_blk, qp, qs, lse_i, delta_i = qi
            mask = _block_mask(qp, kp, qs, ks, kval, causal)

            def compute(carry):
                dq, dk, dv = carry
                s = _scores(q_blk, k_blk, scale, dot)
                p = jnp.where(mask[:, None, None], jnp.exp(s - lse_i[..., None]), 0.0)
                dv = dv + _dot("bkgqs,bqkgh->bskh", p.astype(dt), do_blk, dot)
                dp = _dot("bqkgh,bskh->bkgqs", do_blk, v_blk, dot)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(dt)
                dk = dk + _dot("bkgqs,bqkgh->bskh", ds, q_blk, dot)
                dq_i = _dot("bkgqs,bskh->bqkgh", ds, k_blk, dot)
                return dq.at[i].add(dq_i), dk, dv

            return jax.lax.cond(mask.any(), compute, lambda c: c, carry), None

        zeros_kv = jnp.zeros(k_blk.shape, jnp.float32)
        (dq, dk, dv), _ = jax.lax.scan(
            per_q_block, (dq, zeros_kv, zeros_kv),
            (jnp.arange(q.shape[0]), q, d_out, q_pos, q_seg, lse, delta))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(per_k_block, jnp.zeros(q.shape, jnp.float32),
                                (k, v, kv_pos, kv_seg, kv_valid))
    # integer inputs (positions, segments, validity) get no cotangent
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(qg_btkgh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                        q_positions: jax.Array, kv_positions: jax.Array,
                        q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                        causal: bool, block_q: int, block_k: int, dot_dtype=jnp.float32) -> jax.Array:
    """Attention of grouped queries (B, T, K, G, H) over keys/values (B, S, K, H): (B, T, K, G, H)
    in fp32. Same masking rules as attention.attention_mask; a query that may see no key
    outputs zeros (the reference spreads it uniformly; neither is read by a loss).
    dot_dtype: what each block's matmuls write (model.dot_output); accumulators stay fp32."""
    b, t = qg_btkgh.shape[:2]
    s = k_bskh.shape[1]
    bq, bk = min(block_q, t), min(block_k, s)
    kv_valid = jnp.ones((b, s), bool)
    if q_segment_ids is None:     # one segment for all: the scans need arrays, not None
        q_segment_ids = jnp.ones((b, t), jnp.int32)
        kv_segment_ids = jnp.ones((b, s), jnp.int32)
    # Pad T and S up to whole blocks; padded keys are masked by kv_valid, padded queries dropped.
    q = _blocks(_pad_to(qg_btkgh, 1, bq), 1, bq)
    k = _blocks(_pad_to(k_bskh, 1, bk), 1, bk)
    v = _blocks(_pad_to(v_bskh, 1, bk), 1, bk)
    q_pos = _blocks(_pad_to(q_positions.astype(jnp.int32), 1, bq), 1, bq)
    kv_pos = _blocks(_pad_to(kv_positions.astype(jnp.int32), 1, bk), 1, bk)
    q_seg = _blocks(_pad_to(q_segment_ids.astype(jnp.int32), 1, bq), 1, bq)
    kv_seg = _blocks(_pad_to(kv_segment_ids.astype(jnp.int32), 1, bk), 1, bk)
    kv_val = _blocks(_pad_to(kv_valid, 1, bk, value=False), 1, bk)
    out = _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, kv_val, causal, bq, bk, jnp.dtype(dot_dtype))
    return _unblocks(out, 1)[:, :t]
