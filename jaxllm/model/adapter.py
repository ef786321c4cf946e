"""Bottleneck adapters (Houlsby et al. 2019) as a parameter-tree concern: after the attention
and after the MLP sublayer of every layer, y -> y + s*up(act(down(y))) before the residual add,
with the base frozen and only the adapters trained. adapter.placement=parallel (He et al. 2022)
reads the sublayer's normed input instead: y + s*up(act(down(h))); same parameters.

    delta = init_delta(base_params_or_shapes, adapter_cfg, key)   # up = 0: starts as the base
    params = attach(base, delta, adapter_cfg)                     # what trunk / forward take
    step = make_train_step(loss_fn, optimizer, shardings, merge=make_merge(adapter_cfg))

The delta, stacked along `layers` like the base (model/transformer.py Block reads it):
    {"layers": {"after_attn" | "after_mlp": {"down": {"kernel": (L, d, size), "bias": (L, size)},
                                             "up":   {"kernel": (L, size, d), "bias": (L, d)}}}}
With adapter.trainable_tokens the delta also holds {"tokens": rows} (model/tokens.py); with
adapter.train_norms {"norms": {"attn_norm": (L, d), "mlp_norm": (L, d), "final_norm": (d,)}},
zero-initialised and added to the base's RMSNorm scales when attached (Houlsby et al. train
the layer norms beside the adapters); with adapter.train_embeddings
{"embeddings": {"embed": (V, d), "lm_head": (d, V)}} (no "lm_head" when tied), likewise added to
the input embedding and the LM head (their trained top layer).
Unlike LoRA an adapter cannot be folded into the base weights (the activation sits between
down and up), so there is no merge of weights: serving keeps the attached params.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.config import AdapterConfig, ModelConfig
from jaxllm.configlib import ConfigError
from jaxllm.model import tokens
from jaxllm.model.transformer import ADAPTER_ACTIVATIONS, AdapterOptions

SITES = ("after_attn", "after_mlp")


def check_config(cfg: AdapterConfig) -> None:
    if cfg.size <= 0:
        raise ConfigError(f"adapter.size={cfg.size}: adapters need a bottleneck width >= 1 "
                          "(adapter.size=0 means adapters are off)")
    if cfg.activation not in ADAPTER_ACTIVATIONS:
        raise ConfigError(f"adapter.activation={cfg.activation!r}; valid: {sorted(ADAPTER_ACTIVATIONS)}")


def _geometry(base) -> tuple[int, int, jnp.dtype]:
    """(n_layers, d_model, param dtype) of base params or ShapeDtypeStructs."""
    norm = base["layers"]["attn_norm"]["scale"]       # (L, d)
    return norm.shape[0], norm.shape[1], base["embed"]["embedding"].dtype


NORMS = ("attn_norm", "mlp_norm")
# attach() keeps the base tables that the norms / embeddings deltas change under this key
BASE_TABLES = "adapter_base_tables"


def norm_shapes(n_layers: int, d: int) -> dict:
    return {**{k: (n_layers, d) for k in NORMS}, "final_norm": (d,)}


def embedding_shapes(base) -> dict:
    v, d = base["embed"]["embedding"].shape
    return {"embed": (v, d), **({"lm_head": (d, v)} if "lm_head" in base else {})}


def delta_shapes(n_layers: int, d: int, size: int) -> dict:
    site = {"down": {"kernel": (n_layers, d, size), "bias": (n_layers, size)},
            "up": {"kernel": (n_layers, size, d), "bias": (n_layers, d)}}
    return {"layers": {s: site for s in SITES}}


def init_delta(base, cfg: AdapterConfig, key: jax.Array) -> dict:
    """down ~ N(0, adapter.init_std^2), up and both biases 0, in the base's param dtype."""
    check_config(cfg)
    n, d, dtype = _geometry(base)
    delta: dict = {"layers": {}}
    for i, site in enumerate(SITES):
        k = jax.random.fold_in(key, i)
        down = cfg.init_std * jax.random.normal(k, (n, d, cfg.size), jnp.float32)
        delta["layers"][site] = {
            "down": {"kernel": down.astype(dtype), "bias": jnp.zeros((n, cfg.size), dtype)},
            "up": {"kernel": jnp.zeros((n, cfg.size, d), dtype), "bias": jnp.zeros((n, d), dtype)}}
    if cfg.train_norms:
        delta["norms"] = {k: jnp.zeros(shape, dtype) for k, shape in norm_shapes(n, d).items()}
    if cfg.train_embeddings:
        delta["embeddings"] = {k: jnp.zeros(shape, dtype) for k, shape in embedding_shapes(base).items()}
    if cfg.trainable_tokens:
        delta["tokens"] = tokens.init_rows(base, tokens.ids_of(cfg))
    return delta


def delta_logical_axes(model_cfg: ModelConfig, cfg: AdapterConfig) -> dict:
    """Logical names, same structure as init_delta's result: the bottleneck is 'adapter'
    (unsharded by the presets), d is 'embed' in the kernels and 'norm' in the up bias (like
    the other d-vectors)."""
    check_config(cfg)
    site = {"down": {"kernel": P("layers", "embed", "adapter"), "bias": P("layers", "adapter")},
            "up": {"kernel": P("layers", "adapter", "embed"), "bias": P("layers", "norm")}}
    out = {"layers": {s: site for s in SITES}}
    if cfg.train_norms:
        out["norms"] = {**{k: P("layers", "norm") for k in NORMS}, "final_norm": P("norm")}
    if cfg.train_embeddings:       # as the tables they add to (model/api.py param_logical_axes)
        out["embeddings"] = {"embed": P("vocab", "embed"),
                             **({} if model_cfg.tie_embeddings else {"lm_head": P("embed", "vocab")})}
    if cfg.trainable_tokens:
        out["tokens"] = tokens.logical_axes(model_cfg.tie_embeddings)
    return out


def check_delta(base, delta, cfg: AdapterConfig) -> None:
    n, d, _ = _geometry(base)
    tokens.check_rows(base, delta.get("tokens"), tokens.ids_of(cfg))
    delta = {k: v for k, v in delta.items() if k != "tokens"}
    want = delta_shapes(n, d, cfg.size)
    if cfg.train_norms:
        want["norms"] = norm_shapes(n, d)
    if cfg.train_embeddings:
        want["embeddings"] = embedding_shapes(base)
    flat_want = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        want, is_leaf=lambda x: isinstance(x, tuple))[0]}
    flat_have = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in
                 jax.tree_util.tree_flatten_with_path(delta)[0]}
    if flat_have != flat_want:
        bad = sorted(k for k in flat_want.keys() | flat_have.keys() if flat_want.get(k) != flat_have.get(k))
        raise ConfigError(f"adapter delta does not fit a {n}-layer d_model={d} base with adapter.size="
                          f"{cfg.size}: " + "; ".join(f"{k}: {flat_have.get(k)} (expected {flat_want.get(k)})"
                                                       for k in bad[:4]))


def attach(base: dict, delta: dict, cfg: AdapterConfig) -> dict:
    """{**base, "adapter": {**delta, "options": AdapterOptions(...)}} (options static)."""
    check_config(cfg)
    if "adapter" in base:
        raise ConfigError("these params already carry adapters (an 'adapter' key): attach to the base")
    check_delta(base, delta, cfg)
    # The tables the deltas below add to, as they were: the reference policy (RL, DPO) is the
    # base without any delta, so objectives.policy.reference_params puts these back.
    originals = {}
    if "norms" in delta:
        originals.update(layers={k: base["layers"][k] for k in NORMS}, final_norm=base["final_norm"])
    if "embeddings" in delta:
        originals.update({k: base[k] for k in ("embed", "lm_head") if k in base})
    if "norms" in delta:   # base scale + delta (a new tree: the frozen base is not written)
        norms = delta["norms"]
        layers = {**base["layers"], **{k: {"scale": base["layers"][k]["scale"] + norms[k]} for k in NORMS}}
        base = {**base, "layers": layers, "final_norm": {"scale": base["final_norm"]["scale"] + norms["final_norm"]}}
    if "embeddings" in delta:      # the same for the tables: E + dE, W + dW (a new tree)
        tables = delta["embeddings"]
        base = {**base, "embed": {"embedding": base["embed"]["embedding"] + tables["embed"]},
                **({"lm_head": {"kernel": base["lm_head"]["kernel"] + tables["lm_head"]}} if "lm_head" in base else {})}
    out = {**base, "adapter": {**{k: v for k, v in delta.items() if k not in ("tokens", "norms", "embeddings")},
                               "options": AdapterOptions(cfg.activation, cfg.placement, cfg.scale)},
           **({BASE_TABLES: originals} if originals else {})}
    return tokens.attach(out, delta["tokens"], tokens.ids_of(cfg)) if "tokens" in delta else out


def make_merge(cfg: AdapterConfig):
    """merge(trainable_delta, frozen_base) -> params, for make_train_step(merge=...)."""
    check_config(cfg)

    def merge_fn(delta, base):
        return attach(base, delta, cfg)
    return merge_fn
