"""What RL objectives read off one trunk pass: per-token log-probs of the sampled tokens
(at the sampling temperature), entropies and critic values, aligned to the token they score.

Alignment: arrays indexed by token position t score tokens[t] (predicted from position t-1);
position 0 scores nothing. The rollout code (jaxllm/rl) builds old log-probs, advantages and
returns in the same layout, with `response_mask` (B, T) = 1 on sampled response tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.adapter import BASE_TABLES
from jaxllm.model.api import trunk
from jaxllm.model.heads import token_stats


def to_tokens(x_bt: jax.Array) -> jax.Array:
    """Per-position values (position t predicts t+1) -> per-token values (token t)."""
    return jnp.concatenate([jnp.zeros_like(x_bt[:, :1]), x_bt[:, :-1]], axis=1)


def value_head(params: dict, hidden_btd: jax.Array) -> jax.Array:
    """Scalar critic on the trunk's hidden states, in fp32: (B, T, d) -> (B, T)."""
    vh = params["value_head"]
    return hidden_btd.astype(jnp.float32) @ vh["kernel"].astype(jnp.float32) + vh["bias"].astype(jnp.float32)


def init_value_head(d_model: int) -> dict:
    """Zero-initialised: the critic starts at 0 and learns the returns' scale."""
    return {"kernel": jnp.zeros((d_model,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def policy_outputs(params: dict, batch: dict, model_cfg, *, temperature: float = 1.0,
                   entropy: bool = False, values: bool = False) -> dict:
    """{logprob, [entropy], [value]}: (B, T) each, aligned to tokens (see module doc)."""
    tokens = batch["tokens"]
    hidden, _ = trunk(params, tokens, model_cfg, positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    st = token_stats(params, hidden, targets, model_cfg, temperature=temperature, entropy=entropy)
    out = {"logprob": to_tokens(st["logprob"])}
    if entropy:
        out["entropy"] = to_tokens(st["entropy"])
    if values:
        out["value"] = to_tokens(value_head(params, hidden))
    return out


def reference_params(params: dict) -> dict:
    """The policy with its trainable delta switched off: LoRA / adapters removed, and the base
    tables that adapter.train_norms / train_embeddings add to put back as they were. Under a
    delta the base is frozen, so this IS the reference policy, without a second copy."""
    ref = {k: v for k, v in params.items() if k not in ("lora", "adapter", "tokens", "value_head", BASE_TABLES)}
    originals = params.get(BASE_TABLES, {})
    if "layers" in originals:
        ref["layers"] = {**ref["layers"], **originals["layers"]}
    ref.update({k: v for k, v in originals.items() if k != "layers"})
    return ref
