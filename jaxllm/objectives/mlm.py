"""Masked language modelling (BERT-style) on the same transformer with bidirectional attention.

15% of real tokens are selected; of those 80% become the mask token, 10% a random token and
10% stay; the loss is cross-entropy on the selected positions only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.api import forward
from jaxllm.objectives.clm import masked_cross_entropy


def mask_tokens(tokens_bt, segment_ids_bt, rng, vocab_size: int, mask_id: int, mask_prob: float):
    """-> (corrupted tokens, selected (B, T) bool). Padding is never selected."""
    k_sel, k_kind, k_rand = jax.random.split(rng, 3)
    real = segment_ids_bt != 0
    selected = (jax.random.uniform(k_sel, tokens_bt.shape) < mask_prob) & real
    kind = jax.random.uniform(k_kind, tokens_bt.shape)
    random_tok = jax.random.randint(k_rand, tokens_bt.shape, 0, vocab_size, tokens_bt.dtype)
    corrupted = jnp.where(selected & (kind < 0.8), mask_id, tokens_bt)
    corrupted = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tok, corrupted)
    return corrupted, selected


def make_mlm_loss(model_cfg, mask_prob: float = 0.15, mask_id: int | None = None):
    # Default mask token: the last id of the vocabulary (reserve it in the tokenizer).
    mask_id = model_cfg.vocab_size - 1 if mask_id is None else mask_id

    def loss_fn(params, batch, rng):
        corrupted, selected = mask_tokens(batch["tokens"], batch["segment_ids"], rng,
                                          model_cfg.vocab_size, mask_id, mask_prob)
        logits_btv = forward(params, corrupted, model_cfg, positions=batch["positions"],
                             segment_ids=batch["segment_ids"], causal=False)
        w_bt = selected & (batch["loss_mask"] != 0)
        nll, _, correct = masked_cross_entropy(logits_btv, batch["tokens"], w_bt)
        return nll, {"weight": jnp.sum(w_bt.astype(jnp.float32)), "nll": nll, "accuracy": correct}
    return loss_fn
