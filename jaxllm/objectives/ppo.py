"""PPO's update (Schulman et al. 2017; the RLHF form of Ziegler et al. 2019 / InstructGPT):
clipped policy loss + clipped value loss - entropy bonus, token-weighted over response tokens.

Batch (B, T), aligned to tokens (objectives/policy.py): tokens, positions, segment_ids,
response_mask, old_logprobs, old_values, advantages (whitened by the caller), returns.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxllm.objectives.policy import policy_outputs


def clipped_policy_loss(logp, old_logp, adv, clip: float):
    """Per token: max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old_logp); and whether
    the clip was active."""
    ratio = jnp.exp(logp - old_logp)
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip))
    return loss, (jnp.abs(ratio - 1.0) > clip).astype(jnp.float32)


def clipped_value_loss(values, old_values, returns, clip: float):
    """Per token: 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped within clip of the old V."""
    # clip(V, old - c, old + c), not old + clip(V - old, -c, c): inside the band it is V itself,
    # so b == a there and the clip fraction counts only clipped tokens (the other form differs
    # from V by rounding, and about 1% of unclipped tokens were counted as clipped)
    v_clipped = jnp.clip(values, old_values - clip, old_values + clip)
    a, b = jnp.square(values - returns), jnp.square(v_clipped - returns)
    return 0.5 * jnp.maximum(a, b), (b > a).astype(jnp.float32)


def make_ppo_loss(model_cfg, *, clip: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
                  entropy_coef: float = 0.0, temperature: float = 1.0):
    def loss_fn(params, batch, rng):
        del rng
        out = policy_outputs(params, batch, model_cfg, temperature=temperature, entropy=True, values=True)
        m = batch["response_mask"].astype(jnp.float32)
        pg, clipped = clipped_policy_loss(out["logprob"], batch["old_logprobs"], batch["advantages"], clip)
        vf, v_clipped = clipped_value_loss(out["value"], batch["old_values"], batch["returns"], value_clip)
        per_token = pg + vf_coef * vf - entropy_coef * out["entropy"]
        log_ratio = out["logprob"] - batch["old_logprobs"]
        sums = {"weight": jnp.sum(m), "pg_loss": jnp.sum(pg * m), "vf_loss": jnp.sum(vf * m),
                "entropy": jnp.sum(out["entropy"] * m), "clipfrac": jnp.sum(clipped * m),
                "vf_clipfrac": jnp.sum(v_clipped * m),
                "approx_kl": jnp.sum(0.5 * jnp.square(log_ratio) * m)}
        return jnp.sum(per_token * m), sums
    return loss_fn
