"""Heads on the trunk's hidden states. The LM head's per-token statistics are computed in
sequence chunks, so a training step never holds the whole (B, T, vocab) fp32 logits tensor
(Llama-3-8B at 16k tokens per device: 8.4 GB per copy).

    hidden_btd, _ = trunk(params, tokens_bt, cfg)
    stats = token_stats(params, hidden_btd, targets_bt, cfg)   # dict of (B, T) float32
    nll_bt = -stats["logprob"]

Each chunk's logits are recomputed in the backward pass (jax.checkpoint around the chunk),
so the saved residuals are the hidden states, not the logits.

The reward head reads one hidden state per row, at its last real token:

    rewards_n = reward_head(params["reward_head"], hidden_ntd, segment_ids_nt)   # (N,) float32
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.config import ModelConfig
from jaxllm.model.api import unembed_matrix
from jaxllm.model.matmul import mixed_matmul
from jaxllm.model.tokens import patch_logits
from jaxllm.model.transformer import constrain


def _chunk_stats(h_bcd, y_bc, w_dv, temperature: float, entropy: bool, tok: dict | None = None,
                 dot_dtype=jnp.float32, kernel: str = "xla") -> dict:
    logits = mixed_matmul(h_bcd.astype(w_dv.dtype), w_dv, 1, dot_dtype, kernel).astype(jnp.float32)  # (B, c, V)
    if tok is not None:             # trainable token rows beside a delta (model/tokens.py)
        logits = patch_logits(logits, h_bcd, tok)
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    if temperature != 1.0:
        logits = logits / temperature
    # One max over the vocabulary serves both the log-partition and the accuracy: "argmax ==
    # target" is "target logit >= max" (they differ only on an exact tie for the max, which
    # this counts as a hit). A separate argmax is a variadic (value, index) reduction over the
    # logits: 35 ms of a 1.35 s 25m bf16 step in a profile on jax 0.12.
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)           # as jax.nn.logsumexp: all -inf stays -inf
    lse = m_safe + jnp.log(jnp.sum(jnp.exp(logits - m_safe[..., None]), axis=-1))
    target = jnp.take_along_axis(logits, y_bc[..., None], axis=-1)[..., 0]
    out = {"logprob": target - lse, "lse": lse, "correct": (target >= m).astype(jnp.float32)}
    if entropy:
        p = jnp.exp(logits - lse[..., None])               # softmax, from the lse above
        out["entropy"] = lse - jnp.sum(p * logits, axis=-1)
    return out


def token_stats(params: dict, hidden_btd: jax.Array, targets_bt: jax.Array, cfg: ModelConfig, *,
                temperature: float = 1.0, entropy: bool = False, chunk: int | None = None) -> dict:
    """Per-token float32 (B, T) arrays of the LM head's distribution at each position:
    `logprob` of the target token, `lse` (log-partition, for z-loss), `correct` (argmax ==
    target) and, if asked, `entropy`. Logits are divided by `temperature` first.
    chunk: sequence positions per chunk (default model.logits_chunk; 0 = all at once)."""
    w_dv = unembed_matrix(params, cfg)
    tok = params.get("tokens")
    dot = jnp.dtype(cfg.dot_dtype)
    b, t, d = hidden_btd.shape
    c = cfg.logits_chunk if chunk is None else chunk
    if not c or c >= t:
        return _chunk_stats(hidden_btd, targets_bt, w_dv, temperature, entropy, tok, dot, cfg.matmul)
    n = -(-t // c)
    pad = n * c - t
    h = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    # (B, n*c, ...) -> (n, B, c, ...): scan over chunks, batch sharding untouched.
    h_nbcd = jnp.moveaxis(h.reshape(b, n, c, d), 1, 0)
    y_nbc = jnp.moveaxis(y.reshape(b, n, c), 1, 0)

    @jax.checkpoint
    def body(carry, xs):
        return carry, _chunk_stats(xs[0], xs[1], w_dv, temperature, entropy, tok, dot, cfg.matmul)
    _, out = jax.lax.scan(body, None, (h_nbcd, y_nbc))
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(b, n * c)[:, :t], out)


# ---------------------------------------------------------------------------- the reward head
# A scalar read off the final hidden state of each row's last real token (its end-of-turn):
# by then a causal model has seen the whole prompt and response. params["reward_head"] is
# {"kernel": (d_model,)} with no bias: a Bradley-Terry reward is shift-invariant, and HF's
# sequence-classification `score` layer has none, so the exported model is exactly this one.

def last_token_index(segment_ids_nt: jax.Array) -> jax.Array:
    """(N,) int32: the last position whose segment id is not 0 (right padding follows it).
    An all-padding row gives 0; its reward is garbage and must be masked by the caller."""
    t = segment_ids_nt.shape[-1]
    idx = jnp.where(segment_ids_nt != 0, jnp.arange(t, dtype=jnp.int32), -1)
    return jnp.maximum(jnp.max(idx, axis=-1), 0)


def reward_head(head: dict, hidden_ntd: jax.Array, segment_ids_nt: jax.Array) -> jax.Array:
    """(N,) float32 rewards: kernel . hidden[n, last_token_index(n)]. Only N hidden vectors
    meet the head, never the whole (N, T, d) tensor."""
    idx_n = last_token_index(segment_ids_nt)
    h_nd = jnp.take_along_axis(hidden_ntd, idx_n[:, None, None], axis=1)[:, 0]
    return h_nd.astype(jnp.float32) @ head["kernel"].astype(jnp.float32)


def init_reward_head(cfg: ModelConfig) -> dict:
    """Zero-initialised: every reward starts at 0, so the first ranking loss is exactly log 2
    and the head learns its scale from the data (the trunk's gradient starts once it moves)."""
    return {"kernel": jnp.zeros((cfg.d_model,), jnp.dtype(cfg.param_dtype))}


REWARD_HEAD_AXES = {"kernel": P("embed")}   # logical axes of init_reward_head's tree
