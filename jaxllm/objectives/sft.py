"""Supervised fine-tuning: the causal-LM loss under the chat renderer's loss mask (assistant
content and its end-of-turn token count; system/user turns and role headers do not).

normalize="token" (default): every counted token weighs the same, so long answers dominate.
normalize="sequence": every example (a segment of a packed row) weighs the same: its tokens
share a weight of 1 / (its counted tokens), and the step's weight is the number of examples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.api import trunk
from jaxllm.model.heads import token_stats
from jaxllm.objectives.clm import next_token_targets, weighted_sums


def per_sequence_weights(w_bt: jax.Array, segment_ids_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token weights scaled by 1 / (counted targets of their segment), and the number of
    segments with at least one counted target. w_bt[t] belongs to the target at t + 1, which
    lies in the same segment as position t whenever it is counted."""
    b, t = w_bt.shape
    ids = (jnp.arange(b)[:, None] * t + segment_ids_bt).reshape(-1)       # unique per (row, seg)
    counts = jax.ops.segment_sum(w_bt.reshape(-1), ids, num_segments=b * t)
    per_tok = counts[ids].reshape(b, t)
    scaled = jnp.where(per_tok > 0, w_bt / jnp.maximum(per_tok, 1.0), 0.0)
    return scaled, jnp.sum(counts > 0).astype(jnp.float32)


def make_sft_loss(model_cfg, *, z_loss: float = 0.0, normalize: str = "token"):
    if normalize not in ("token", "sequence"):
        raise ValueError(f"SFT normalisation must be 'token' or 'sequence', got {normalize!r}")

    def loss_fn(params, batch, rng):
        # rng: LoRA dropout when configured (the base model has no dropout)
        hidden_btd, _ = trunk(params, batch["tokens"], model_cfg, positions=batch["positions"],
                              segment_ids=batch["segment_ids"], dropout_rng=rng)
        targets_bt, w_bt = next_token_targets(batch)
        stats = token_stats(params, hidden_btd, targets_bt, model_cfg)
        if normalize == "token":
            return weighted_sums(stats, w_bt, z_loss)
        scaled, n_seq = per_sequence_weights(w_bt, batch["segment_ids"])
        loss, sums = weighted_sums(stats, scaled, z_loss)
        sums["weight"] = n_seq
        sums["tokens"] = jnp.sum(w_bt)
        return loss, sums
    return loss_fn
