"""GRPO (Shao et al. 2024, DeepSeekMath): no critic; each prompt's G samples are scored and
their advantages normalised within the group (rl/advantages.group_advantages), broadcast over
the response's tokens. Clipped ratio as PPO, plus beta * k3 KL to the reference per token;
each response's tokens are averaged, then responses averaged (the paper's 1/G sum 1/|o_i|).

Batch (B, T), aligned to tokens: tokens, positions, segment_ids, response_mask, old_logprobs,
ref_logprobs, advantages; and optionally kl_coef (B,), the KL coefficient of this iteration
for each row (the recipe's adaptive beta, rl.kl_target > 0): a batch value, so a changing beta
does not recompile the step. Without it the loss uses the `beta` it was built with.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxllm.objectives.policy import policy_outputs
from jaxllm.objectives.ppo import clipped_policy_loss
from jaxllm.rl.kl import kl_estimate


def make_grpo_loss(model_cfg, *, clip: float = 0.2, beta: float = 0.04, temperature: float = 1.0):
    def loss_fn(params, batch, rng):
        del rng
        out = policy_outputs(params, batch, model_cfg, temperature=temperature)
        m = batch["response_mask"].astype(jnp.float32)
        pg, clipped = clipped_policy_loss(out["logprob"], batch["old_logprobs"], batch["advantages"], clip)
        kl = kl_estimate(out["logprob"], batch["ref_logprobs"], "k3")
        beta_b = batch["kl_coef"][:, None] if "kl_coef" in batch else beta
        n_tok = jnp.sum(m, axis=1, keepdims=True)
        w = jnp.where(n_tok > 0, m / jnp.maximum(n_tok, 1.0), 0.0)      # 1/|o_i| per token
        sums = {"weight": jnp.sum(n_tok > 0).astype(jnp.float32), "pg_loss": jnp.sum(pg * w),
                "kl": jnp.sum(kl * w), "clipfrac": jnp.sum(clipped * w)}
        return jnp.sum((pg + beta_b * kl) * w), sums
    return loss_fn
