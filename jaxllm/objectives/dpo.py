"""DPO (Rafailov et al. 2023): -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) -
(log pi(y_l) - log ref(y_l))]) per preference pair, sequence log-probs summed over the
response tokens.

Batch: tokens, positions, segment_ids, response_mask (B, 2, T) with index 0 = chosen,
1 = rejected; `ref_logps` (B, 2) when precomputed. Otherwise the reference comes from the
params: the frozen base with the LoRA/adapter delta switched off (no second copy), or
params["reference"] (a frozen full copy passed as the step's frozen argument).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.objectives.policy import policy_outputs, reference_params


def sequence_logps(params, batch, model_cfg) -> jax.Array:
    """(B, 2) summed log-probs of the response tokens of chosen and rejected."""
    b, two, t = batch["tokens"].shape
    flat = {k: batch[k].reshape(b * two, t) for k in ("tokens", "positions", "segment_ids")}
    logp = policy_outputs(params, flat, model_cfg)["logprob"]
    m = batch["response_mask"].reshape(b * two, t).astype(jnp.float32)
    return jnp.sum(logp * m, axis=-1).reshape(b, two)


def dpo_loss(policy_logps, ref_logps, beta: float, label_smoothing: float = 0.0):
    """Per pair: the loss and the implicit reward margin beta * (chosen - rejected)."""
    margin = beta * ((policy_logps[:, 0] - ref_logps[:, 0]) - (policy_logps[:, 1] - ref_logps[:, 1]))
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(-margin)
    return loss, margin


def make_dpo_loss(model_cfg, *, beta: float = 0.1, label_smoothing: float = 0.0):
    def loss_fn(params, batch, rng):
        del rng
        policy = sequence_logps(params, batch, model_cfg)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif "reference" in params:
            ref = sequence_logps(params["reference"], batch, model_cfg)
        elif "lora" in params or "adapter" in params:
            ref = sequence_logps(reference_params(params), batch, model_cfg)
        else:
            raise ValueError("DPO needs reference log-probs: batch['ref_logps'], a frozen "
                             "params['reference'], or a LoRA/adapter delta over a frozen base")
        ref = jax.lax.stop_gradient(ref)
        loss, margin = dpo_loss(policy, ref, beta, label_smoothing)
        sums = {"weight": jnp.asarray(loss.shape[0], jnp.float32), "accuracy": jnp.sum(margin > 0),
                "margin": jnp.sum(margin)}
        return jnp.sum(loss), sums
    return loss_fn
