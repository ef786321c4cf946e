"""Causal language modelling: next-token cross-entropy over targets the batch marks."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.api import forward


def target_weights(batch: dict) -> jax.Array:
    """(B, T-1) weights of the targets tokens[:, 1:]: counted by loss_mask, never across a
    document boundary (a document's first token is not predicted from the previous one)."""
    seg = batch["segment_ids"]
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return (batch["loss_mask"][:, 1:] != 0) & same_doc


def masked_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                         z_loss: float = 0.0):
    """Sum of weighted token cross-entropies (fp32), plus the sum of weighted z-loss terms."""
    logits_btv = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    w = weights_bt.astype(jnp.float32)
    nll_sum = jnp.sum((lse_bt - target_logit_bt) * w)
    z_sum = jnp.sum(jnp.square(lse_bt) * w)
    correct = jnp.sum((jnp.argmax(logits_btv, -1) == targets_bt) * w)
    return nll_sum, z_loss * z_sum, correct


def make_clm_loss(model_cfg, z_loss: float = 0.0):
    def loss_fn(params, batch, rng):
        del rng
        logits_btv = forward(params, batch["tokens"], model_cfg, positions=batch["positions"],
                             segment_ids=batch["segment_ids"])
        w_bt = target_weights(batch)
        nll, z, correct = masked_cross_entropy(logits_btv[:, :-1], batch["tokens"][:, 1:], w_bt, z_loss)
        weight = jnp.sum(w_bt.astype(jnp.float32))
        return nll + z, {"weight": weight, "nll": nll, "accuracy": correct}
    return loss_fn
