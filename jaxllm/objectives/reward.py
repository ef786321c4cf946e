"""Reward modelling from K-way rankings (InstructGPT, Ouyang et al. 2022).

Batch (data/preference.py): tokens, positions, segment_ids (B, K, T), one row per response
(1 on its real tokens, 0 on padding), and response_mask (B, K) (1 for real responses, 0 for
the rows that pad K up to reward.k_max). Rank order is index order: response 0 is the best.

All K responses of a prompt pass the trunk as K rows of one batch element, so each is scored
once however many pairs it is in (not one forward pass per pair). Every pair i < j of real
responses adds the Bradley-Terry loss of "i beats j":

    loss = mean over pairs of  -log sigmoid(r_i - r_j - margin)
         + center_coef * mean over pairs of (r_i^2 + r_j^2) / 2

Each response of a K-way ranking sits in K-1 of its K(K-1)/2 pairs, so the second term is
center_coef * mean(r^2) over the responses (each prompt weighted by its pair count when K
varies). Written per pair, it is a sum like the first term, so the step's pair-weighted mean
stays exact under microbatching and sharding. It pins the reward's free offset near 0.

Sums (the step divides them by `weight`): weight = valid pairs, accuracy = pairs ranked right
(a tie counts one half: a coin flip), margin = sum of r_i - r_j, ranking = the -log sigmoid part,
center = the centering part (only when center_coef > 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.api import trunk
from jaxllm.model.heads import reward_head


def pair_mask(response_mask_bk: jax.Array) -> jax.Array:
    """(B, K, K) float32: 1 at [b, i, j] when i < j and both responses are real."""
    k = response_mask_bk.shape[-1]
    real = response_mask_bk != 0
    upper = jnp.triu(jnp.ones((k, k), bool), 1)
    return (upper[None] & real[:, :, None] & real[:, None, :]).astype(jnp.float32)


def ranking_sums(rewards_bk: jax.Array, response_mask_bk: jax.Array, *, margin: float = 0.0,
                 center_coef: float = 0.0) -> tuple[jax.Array, dict]:
    """(loss_sum, sums) over every valid pair of every ranking (see the module docstring)."""
    r = rewards_bk.astype(jnp.float32)
    m_bkk = pair_mask(response_mask_bk)
    on = m_bkk > 0
    # where(), not a product: a masked row's reward may be anything; it must not reach a sum
    d_bkk = jnp.where(on, r[:, :, None] - r[:, None, :], 0.0)
    ranking = jnp.sum(jnp.where(on, -jax.nn.log_sigmoid(d_bkk - margin), 0.0))
    right = jnp.where(d_bkk > 0, 1.0, jnp.where(d_bkk == 0, 0.5, 0.0))
    sums = {"weight": jnp.sum(m_bkk), "accuracy": jnp.sum(right * m_bkk), "margin": jnp.sum(d_bkk),
            "ranking": ranking}
    loss = ranking
    if center_coef:
        sq = jnp.square(r)
        center = center_coef * jnp.sum(jnp.where(on, 0.5 * (sq[:, :, None] + sq[:, None, :]), 0.0))
        sums["center"] = center
        loss = loss + center
    return loss, sums


def score(params: dict, tokens_nt, segment_ids_nt, cfg, *, positions_nt=None) -> jax.Array:
    """(N,) float32 rewards of N right-padded rows (segment_ids 1 on real tokens, 0 on
    padding), each read at its last real token. params: the trunk's plus "reward_head"."""
    hidden_ntd, _ = trunk(params, tokens_nt, cfg, positions=positions_nt, segment_ids=segment_ids_nt)
    return reward_head(params["reward_head"], hidden_ntd, jnp.asarray(segment_ids_nt))


def make_reward_loss(model_cfg, *, margin: float = 0.0, center_coef: float = 0.0):
    """The objective: `loss_fn(params, batch, rng) -> (loss_sum, sums)` on (B, K, T) batches."""
    if margin < 0 or center_coef < 0:
        raise ValueError(f"reward margin and center_coef must be >= 0, got {margin}, {center_coef}")

    def loss_fn(params, batch, rng):
        del rng
        b, k, t = batch["tokens"].shape
        flat = {key: batch[key].reshape(b * k, t) for key in ("tokens", "positions", "segment_ids")}
        r_bk = score(params, flat["tokens"], flat["segment_ids"], model_cfg,
                     positions_nt=flat["positions"]).reshape(b, k)
        return ranking_sums(r_bk, batch["response_mask"], margin=margin, center_coef=center_coef)
    return loss_fn
