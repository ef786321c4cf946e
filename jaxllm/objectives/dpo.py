"""DPO (Rafailov et al. 2023) on ranked responses: for every pair (i better than j) of a
prompt's responses, -log sigmoid(beta * [(log pi(y_i) - log ref(y_i)) - (log pi(y_j) -
log ref(y_j))]), sequence log-probs summed over the response's tokens. A chosen/rejected pair
is the K = 2 case; K > 2 rankings give all K-choose-2 pairs, like the reward model.

Batch (the preference pipeline's): tokens, positions, segment_ids, loss_mask (B, K, T) with
index order = rank order, response_mask (B, K); `ref_logps` (B, K) when precomputed.
Otherwise the reference comes from the params: the frozen base with the LoRA/adapter delta
switched off (no second copy), or params["reference"] (a frozen full copy, passed as the
step's frozen argument).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.objectives.policy import policy_outputs, reference_params
from jaxllm.objectives.reward import pair_mask


def sequence_logps(params, batch, model_cfg) -> jax.Array:
    """(B, K) summed log-probs of each response's tokens (loss_mask) given its prompt."""
    b, k, t = batch["tokens"].shape
    flat = {n: batch[n].reshape(b * k, t) for n in ("tokens", "positions", "segment_ids")}
    logp = policy_outputs(params, flat, model_cfg)["logprob"]
    m = batch["loss_mask"].reshape(b * k, t).astype(jnp.float32)
    return jnp.sum(logp * m, axis=-1).reshape(b, k)


def dpo_loss(policy_logps, ref_logps, beta: float, label_smoothing: float = 0.0):
    """Per (chosen, rejected) pair in columns 0 and 1: the loss and the implicit reward margin
    beta * (chosen - rejected)."""
    margin = beta * ((policy_logps[:, 0] - ref_logps[:, 0]) - (policy_logps[:, 1] - ref_logps[:, 1]))
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(-margin)
    return loss, margin


def reference_logps(params, batch, model_cfg) -> jax.Array:
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if "reference" in params:
        return sequence_logps(params["reference"], batch, model_cfg)
    if "lora" in params or "adapter" in params or "tokens" in params:
        return sequence_logps(reference_params(params), batch, model_cfg)
    raise ValueError("DPO needs reference log-probs: batch['ref_logps'], a frozen "
                     "params['reference'], or a LoRA/adapter delta over a frozen base")


def make_dpo_loss(model_cfg, *, beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float = 0.0):
    """Summed over pairs (the step divides by the pair count). rpo_alpha > 0 adds RPO's term
    (Pang et al. 2024; TRL's `rpo_alpha`): alpha times the best response's per-token NLL, once
    per pair its prompt contributes, so the mean loss is DPO's mean + alpha * that NLL's mean
    over pairs. It keeps DPO from lowering the likelihood of the answers it prefers."""
    def loss_fn(params, batch, rng):
        del rng
        policy_params = {k: v for k, v in params.items() if k != "reference"}
        logps = sequence_logps(policy_params, batch, model_cfg)                  # (B, K)
        implicit = beta * (logps - jax.lax.stop_gradient(reference_logps(params, batch, model_cfg)))
        diff = implicit[:, :, None] - implicit[:, None, :]                        # (B, K, K): i over j
        on = pair_mask(batch["response_mask"])                                   # i ranked above j
        loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(diff) - label_smoothing * jax.nn.log_sigmoid(-diff)
        pairs_b = jnp.sum(on, axis=(1, 2))                                       # (B,)
        # the best response's implicit reward once per pair of its prompt: the step divides by
        # the pair count, so the metric is the mean over prompts (pair-weighted when K varies)
        sums = {"weight": jnp.sum(on), "accuracy": jnp.sum(on * (diff > 0)), "margin": jnp.sum(on * diff),
                "chosen_reward": jnp.sum(implicit[:, 0] * pairs_b)}
        total = jnp.sum(loss * on)
        if rpo_alpha:
            n_best = jnp.maximum(jnp.sum(batch["loss_mask"][:, 0].astype(jnp.float32), -1), 1.0)
            nll_b = -logps[:, 0] / n_best                                        # (B,) per-token NLL
            sums["chosen_nll"] = jnp.sum(nll_b * pairs_b)
            total = total + rpo_alpha * sums["chosen_nll"]
        return total, sums
    return loss_fn
