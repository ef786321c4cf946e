"""KL between the policy and the reference, estimated per sampled token (Schulman, "Approximating
KL divergence", 2020), and the adaptive KL coefficient of Ziegler et al. (2019).

With log_ratio = log pi(y) - log pi_ref(y) at tokens y sampled from pi:
  k1 = log_ratio                      unbiased, high variance, can be negative
  k2 = log_ratio^2 / 2                biased, low variance
  k3 = (exp(-log_ratio) - 1) + log_ratio   unbiased, low variance, always >= 0
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k1") -> jax.Array:
    lr = logp - ref_logp
    if kind == "k1":
        return lr
    if kind == "k2":
        return 0.5 * jnp.square(lr)
    if kind == "k3":
        return jnp.expm1(-lr) + lr
    raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k2, k3")


@dataclasses.dataclass
class AdaptiveKL:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon): raises the
    penalty when the policy drifts further than `target` nats, lowers it when it stays closer.
    Its state (beta) is part of the RL controller state saved in checkpoints."""
    beta: float
    target: float
    horizon: float

    def update(self, kl: float, n_steps: int) -> float:
        err = float(jnp.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.beta *= 1.0 + err * n_steps / self.horizon
        return self.beta


def per_token_rewards(scores_b: jax.Array, kl_bt: jax.Array, mask_bt: jax.Array, beta) -> jax.Array:
    """PPO's reward: -beta * KL at every response token, plus the sequence's score at its last
    real token (its eos, or the last token when it hit max length)."""
    m = mask_bt.astype(jnp.float32)
    t = mask_bt.shape[1]
    last = jnp.max(jnp.where(m > 0, jnp.arange(t)[None, :], -1), axis=1)          # (B,)
    at_last = (jnp.arange(t)[None, :] == last[:, None]).astype(jnp.float32)
    return (-beta * kl_bt + scores_b[:, None] * at_last) * m


def sequence_logprob(logp_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    return jnp.sum(logp_bt * mask_bt.astype(jnp.float32), axis=-1)

