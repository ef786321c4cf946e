"""Causal language modelling: next-token cross-entropy over the targets the batch marks.

The trunk runs once; the LM head's statistics come from model.heads.token_stats in sequence
chunks, so the (B, T, vocab) logits are never held whole. SFT is this loss under the chat
renderer's loss mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.api import trunk
from jaxllm.model.heads import token_stats


def target_weights(batch: dict) -> jax.Array:
    """(B, T-1) weights of the targets tokens[:, 1:]: counted by loss_mask, never across a
    document boundary (a document's first token is not predicted from the previous one)."""
    seg = batch["segment_ids"]
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return (batch["loss_mask"][:, 1:] != 0) & same_doc


def next_token_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(targets, weights), both (B, T) and aligned with the positions that predict them:
    position t predicts tokens[t+1]; the last position predicts nothing (weight 0)."""
    tokens = batch["tokens"]
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    w = target_weights(batch).astype(jnp.float32)
    return targets, jnp.concatenate([w, jnp.zeros_like(w[:, :1])], axis=1)


def masked_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                         z_loss: float = 0.0):
    """Reference (unchunked) form on full logits: sums of weighted token cross-entropies,
    z-loss terms and argmax hits. Training uses token_stats; tests compare the two."""
    logits_btv = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    w = weights_bt.astype(jnp.float32)
    nll_sum = jnp.sum((lse_bt - target_logit_bt) * w)
    z_sum = jnp.sum(jnp.square(lse_bt) * w)
    correct = jnp.sum((jnp.argmax(logits_btv, -1) == targets_bt) * w)
    return nll_sum, z_loss * z_sum, correct


def weighted_sums(stats: dict, w_bt: jax.Array, z_loss: float) -> tuple[jax.Array, dict]:
    """(loss_sum, metric sums) from token_stats under per-token weights."""
    nll = -jnp.sum(stats["logprob"] * w_bt)
    z = z_loss * jnp.sum(jnp.square(stats["lse"]) * w_bt)
    sums = {"weight": jnp.sum(w_bt), "nll": nll, "accuracy": jnp.sum(stats["correct"] * w_bt)}
    if z_loss:
        sums["z_loss"] = z
    return nll + z, sums


def make_clm_loss(model_cfg, z_loss: float = 0.0):
    def loss_fn(params, batch, rng):
        # rng: LoRA dropout when configured (the base model has no dropout)
        hidden_btd, _ = trunk(params, batch["tokens"], model_cfg, positions=batch["positions"],
                              segment_ids=batch["segment_ids"], dropout_rng=rng)
        targets_bt, w_bt = next_token_targets(batch)
        return weighted_sums(token_stats(params, hidden_btd, targets_bt, model_cfg), w_bt, z_loss)
    return loss_fn
