"""Masked language modelling (BERT-style) on the same transformer with bidirectional attention.

`mask_prob` of the real tokens are selected; of those 80% become the mask token, 10% a random
token and 10% stay; the loss is cross-entropy on the selected positions only. The mask token
is the tokenizer's `<mask>` piece or an explicit id; random replacements are drawn from the
real (non-special) tokens only, so the model never sees a special token where text was.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model.api import trunk
from jaxllm.model.heads import token_stats
from jaxllm.objectives.clm import weighted_sums


def mask_tokens(tokens_bt, segment_ids_bt, rng, replacement_ids: jax.Array, mask_id: int,
                mask_prob: float):
    """-> (corrupted tokens, selected (B, T) bool). Padding is never selected."""
    k_sel, k_kind, k_rand = jax.random.split(rng, 3)
    real = segment_ids_bt != 0
    selected = (jax.random.uniform(k_sel, tokens_bt.shape) < mask_prob) & real
    kind = jax.random.uniform(k_kind, tokens_bt.shape)
    pick = jax.random.randint(k_rand, tokens_bt.shape, 0, replacement_ids.shape[0])
    random_tok = replacement_ids[pick].astype(tokens_bt.dtype)
    corrupted = jnp.where(selected & (kind < 0.8), mask_id, tokens_bt)
    corrupted = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tok, corrupted)
    return corrupted, selected


def make_mlm_loss(model_cfg, *, mask_id: int, mask_prob: float = 0.15, z_loss: float = 0.0,
                  special_ids: Sequence[int] = (), real_vocab_size: int | None = None):
    """special_ids: never drawn as random replacements (pad, bos, eos, chat markers, mask);
    real_vocab_size: the tokenizer's size when the model's vocabulary is padded beyond it."""
    n = real_vocab_size or model_cfg.vocab_size
    if not 0 <= mask_id < model_cfg.vocab_size:
        raise ValueError(f"MLM mask id {mask_id} is outside the model vocabulary "
                         f"(0..{model_cfg.vocab_size - 1})")
    replacement_ids = np.setdiff1d(np.arange(n), np.asarray(list(special_ids) + [mask_id]))
    if replacement_ids.size == 0:
        raise ValueError("MLM: no non-special token ids left for random replacements")

    def loss_fn(params, batch, rng):
        rng = jax.random.key(0) if rng is None else rng   # evaluation: the same masks every time
        corrupted, selected = mask_tokens(batch["tokens"], batch["segment_ids"], rng,
                                          jnp.asarray(replacement_ids, jnp.int32), mask_id, mask_prob)
        hidden_btd, _ = trunk(params, corrupted, model_cfg, positions=batch["positions"],
                              segment_ids=batch["segment_ids"], causal=False)
        w_bt = (selected & (batch["loss_mask"] != 0)).astype(jnp.float32)
        return weighted_sums(token_stats(params, hidden_btd, batch["tokens"], model_cfg), w_bt, z_loss)
    return loss_fn
