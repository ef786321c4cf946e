"""Pure functions over plain parameter pytrees: what research code imports.

    params = init_params(model_cfg, jax.random.key(0))
    logits_btv = forward(params, tokens_bt, model_cfg, positions=None, segment_ids=None)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.model.transformer import Transformer


def positions_from_segments(segment_ids_bt: jax.Array) -> jax.Array:
    """Per-document positions: 0 at each segment start, counting up inside the segment."""
    t = segment_ids_bt.shape[1]
    idx = jnp.arange(t)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids_bt[:, :1], bool),
                              segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(jnp.int32)


def _inputs(tokens_bt, positions, segment_ids):
    tokens_bt = jnp.asarray(tokens_bt)
    if tokens_bt.ndim != 2:
        raise ValueError(f"tokens must be (batch, time), got shape {tokens_bt.shape}")
    if positions is None:
        if segment_ids is not None:
            positions = positions_from_segments(jnp.asarray(segment_ids))
        else:
            positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
    return tokens_bt, jnp.asarray(positions), None if segment_ids is None else jnp.asarray(segment_ids)


def _boxed_init(cfg: ModelConfig, key, causal: bool = True):
    tokens = jnp.zeros((1, 2), jnp.int32)
    # Empty logical rules: no sharding constraints inside init (Flax would constrain flattened
    # kernels); callers place the result with jit out_shardings instead.
    with nn.logical_axis_rules(()):
        return Transformer(cfg, causal).init(key, tokens, tokens, None)["params"]


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """A plain pytree of arrays (no Flax boxes). Stacked layers have a leading n_layers axis."""
    boxed = _boxed_init(cfg, key)
    with nn.logical_axis_rules(()):
        return nn.meta.unbox(boxed)


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Pytree (same structure as params) of PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))
    return nn.get_partition_spec(boxed)


def param_shapes(cfg: ModelConfig) -> dict:
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def forward(params: dict, tokens_bt, cfg: ModelConfig, positions=None, segment_ids=None,
            causal: bool = True) -> jax.Array:
    """Logits (B, T, vocab) in float32. segment_ids: attention never crosses segments
    (0 = padding); positions drive RoPE (default: per-segment positions, else 0..T-1)."""
    tokens_bt, positions, segment_ids = _inputs(tokens_bt, positions, segment_ids)
    return Transformer(cfg, causal).apply({"params": params}, tokens_bt, positions, segment_ids)


def hidden_states(params: dict, tokens_bt, cfg: ModelConfig, positions=None, segment_ids=None,
                  causal: bool = True) -> jax.Array:
    """Final-norm hidden states (B, T, d_model): the input to value and reward heads."""
    tokens_bt, positions, segment_ids = _inputs(tokens_bt, positions, segment_ids)
    return Transformer(cfg, causal).apply({"params": params}, tokens_bt, positions, segment_ids,
                                          return_hidden=True)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
