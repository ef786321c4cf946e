"""Logical axis names -> mesh axes: DP, FSDP and tensor parallelism are rule tables.

Parameters are annotated with logical names (model/transformer.py); activations with
`activation_*` names. A preset table plus per-entry overrides from config give the rules;
optimizer state follows its parameter because it is sharded with the same specs.
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.config import MeshConfig

_ACTIVATIONS_DP = {"activation_batch": ("data", "fsdp")}
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # Pure data parallel: parameters replicated, batch split.
    "dp": {**_ACTIVATIONS_DP},
    # ZeRO-3: every matrix is split on its embed dimension; all-gathered per layer in use.
    "fsdp": {**_ACTIVATIONS_DP, "embed": ("fsdp",)},
    # FSDP + Megatron tensor parallel: heads and MLP columns split over `tensor`
    # (q/k/v/gate/up column-parallel, o/down row-parallel), vocab split too.
    "fsdp_tp": {**_ACTIVATIONS_DP, "embed": ("fsdp",), "heads": ("tensor",),
                "kv_heads": ("tensor",), "mlp": ("tensor",), "vocab": ("tensor",),
                "activation_heads": ("tensor",), "activation_mlp": ("tensor",),
                "activation_vocab": ("tensor",)},
}


PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed",
                   "activation_heads", "activation_mlp", "activation_vocab")
MESH_AXES = ("data", "fsdp", "tensor")


def check_rule_overrides(rules: dict) -> None:
    """Reject misspelt logical names or mesh axes in `mesh.rules` with the closest valid one."""
    import difflib

    from jaxllm.configlib import ConfigError
    for name, axes in rules.items():
        if name not in PARAM_AXES + ACTIVATION_AXES:
            close = difflib.get_close_matches(name, PARAM_AXES + ACTIVATION_AXES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"mesh.rules: unknown logical axis '{name}'{hint} "
                              f"(valid: {list(PARAM_AXES + ACTIVATION_AXES)})")
        for ax in axes:
            if ax not in MESH_AXES:
                raise ConfigError(f"mesh.rules.{name}: unknown mesh axis '{ax}' (valid: {list(MESH_AXES)})")


def logical_rules(cfg: MeshConfig) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """Flax-style rule list ((logical, mesh_axes), ...), preset then overrides."""
    table = dict(PRESETS[cfg.preset])
    table.update({k: tuple(v) for k, v in cfg.rules.items()})
    return tuple((k, v if v else None) for k, v in table.items())


def logical_to_mesh_spec(names: P, shape: tuple[int, ...], rules, mesh: Mesh) -> P:
    """Map one logical PartitionSpec to a mesh PartitionSpec. A mesh axis that does not
    divide its dimension (e.g. 2 kv heads on tensor=4) is dropped: that dim is replicated."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names))):
        axes = table.get(name) if name is not None else None
        kept = []
        size = 1
        for ax in axes or ():
            n = mesh.shape[ax]
            if ax in used or n == 1 or dim % (size * n):
                continue
            kept.append(ax)
            size *= n
        used.update(kept)
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


def param_shardings(logical_specs, shapes, rules, mesh: Mesh):
    """Pytree of NamedShardings for parameters (and anything shaped like them)."""
    return jax.tree.map(
        lambda spec, s: NamedSharding(mesh, logical_to_mesh_spec(spec, s.shape, rules, mesh)),
        logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dim split over every data-like axis; the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
