"""Advantages for policy-gradient updates, over (B, T) arrays of response tokens.

    mask_bt     1 on real response tokens (the sampled ones, up to and including eos)
    rewards_bt  per-token rewards (PPO: -beta * KL everywhere, + the score at the last token)
    values_bt   the critic's value before each token

GAE (Schulman et al. 2016) runs right to left: delta_t = r_t + gamma V_{t+1} - V_t and
A_t = delta_t + gamma lambda A_{t+1}, with V and A beyond the last real token taken as 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """-> (advantages, returns = advantages + values), both (B, T), 0 where mask is 0.
    Masked positions may sit anywhere (left or right padding): they neither add reward nor
    pass value or advantage through."""
    m = mask_bt.astype(jnp.float32)
    r, v = rewards_bt * m, values_bt * m

    def back(carry, xs):
        next_v, next_a = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_v - v_t
        a_t = (delta + gamma * lam * next_a) * m_t
        # a masked position hands on the carry of the next real token unchanged
        carry = (jnp.where(m_t > 0, v_t, next_v), jnp.where(m_t > 0, a_t, next_a))
        return carry, a_t
    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv_tb = jax.lax.scan(back, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv_tb.T
    return adv, (adv + v) * m


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries of the whole batch (unbiased variance, as
    TRL); shift_mean=False keeps the mean. Masked-out entries come back as 0."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 2.0)
    mean = jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
    var = jnp.sum(jnp.square(x - mean) * m) / (n - 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def group_advantages(scores_bg: jax.Array, *, eps: float = 1e-6, scale: bool = True) -> jax.Array:
    """GRPO (Shao et al. 2024): each of the G samples of a prompt is scored against its own
    group: (r - mean_group) / (std_group + eps). (B, G) -> (B, G)."""
    mean = jnp.mean(scores_bg, axis=-1, keepdims=True)
    out = scores_bg - mean
    if scale:
        out = out / (jnp.std(scores_bg, axis=-1, keepdims=True) + eps)
    return out
