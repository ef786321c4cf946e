"""The one attention entry point: causal/bidirectional, GQA, packed segments, kernel choice."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_mask(segment_ids_bt: jax.Array | None, causal: bool, t: int) -> jax.Array | None:
    """(B, 1, T, T) boolean mask: same segment (and not padding), and causal if asked.

    Padding (segment 0) attends to itself only along the diagonal so its softmax stays finite;
    its outputs are never used by a loss.
    """
    mask = None
    if causal:
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if segment_ids_bt is not None:
        same = segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :]
        same = same & ((segment_ids_bt[:, None, :, None] != 0) | jnp.eye(t, dtype=bool)[None, None])
        mask = same if mask is None else mask & same
    return mask


def attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, *,
              segment_ids_bt: jax.Array | None = None, causal: bool = True,
              implementation: str = "xla") -> jax.Array:
    """Scaled dot-product attention; q has N heads, k/v have K heads with N % K == 0.

    `implementation` is passed to jax.nn.dot_product_attention: "xla" everywhere, "cudnn"
    (fused flash attention) on NVIDIA GPUs. Softmax runs in fp32 whatever the compute dtype.
    """
    b, t, n, h = q_btnh.shape
    k = k_btkh.shape[2]
    assert n % k == 0, (n, k)
    if implementation == "cudnn":
        # cuDNN takes segment ids natively only through its own arguments; the fused kernel
        # is used for plain causal/bidirectional rows and the XLA path for packed rows.
        if segment_ids_bt is None:
            return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, is_causal=causal,
                                                implementation="cudnn")
    mask = segment_mask(segment_ids_bt, causal, t)
    # Group query heads per kv head: (B, T, K, G, H) so GQA needs no repeat of k/v in memory.
    g = n // k
    qg = q_btnh.reshape(b, t, k, g, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_btkh,
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_btkh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_btkh, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)
