"""Logical axis names -> mesh axes: DP, FSDP and tensor parallelism are rule tables.

Parameters are annotated with logical names (model/transformer.py); activations with
`activation_*` names. A preset table plus per-entry overrides from config give the rules;
optimizer state follows its parameter because it is sharded with the same specs.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import MeshConfig
from jaxllm.parallel.axes import BATCH_AXES

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


def logical_rules(cfg: MeshConfig) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """Flax-style rule list ((logical, mesh_axes), ...), preset then overrides."""
    table = dict(PRESETS[cfg.preset])
    table.update({k: tuple(v) for k, v in cfg.rules.items()})
    return tuple((k, v if v else None) for k, v in table.items())


def _map_spec(names: P, shape: tuple[int, ...], table: dict, mesh: Mesh):
    """-> (mesh PartitionSpec, [(dim index, logical name, mesh axis, dim size) dropped])."""
    used: set[str] = set()
    out, dropped = [], []
    for i, (dim, name) in enumerate(zip(shape, tuple(names) + (None,) * (len(shape) - len(names)))):
        axes = table.get(name) if name is not None else None
        kept = []
        size = 1
        for ax in axes or ():
            n = mesh.shape[ax]
            if ax in used or n == 1:
                continue
            if dim % (size * n):
                dropped.append((i, name, ax, dim))
                continue
            kept.append(ax)
            size *= n
        used.update(kept)
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out), dropped


def logical_to_mesh_spec(names: P, shape: tuple[int, ...], rules, mesh: Mesh) -> P:
    """Map one logical PartitionSpec to a mesh PartitionSpec. A mesh axis that does not
    divide its dimension (e.g. 2 kv heads on tensor=4) is dropped: that dim is replicated
    (sharding_report says so, and start-up refuses beyond mesh.replication_tolerance)."""
    return _map_spec(names, shape, dict(rules), mesh)[0]


def param_shardings(logical_specs, shapes, rules, mesh: Mesh):
    """Pytree of NamedShardings for parameters (and anything shaped like them)."""
    return jax.tree.map(
        lambda spec, s: NamedSharding(mesh, logical_to_mesh_spec(spec, s.shape, rules, mesh)),
        logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over every data-like axis; the rest replicated. The spec
    names only the first dim, so one sharding fits batch leaves of any rank: (B,), (B, T),
    (B, K, T), ..."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _shard_factor(spec: P, mesh: Mesh) -> int:
    f = 1
    for entry in spec:
        for ax in (entry if isinstance(entry, tuple) else (entry,)):
            if ax is not None:
                f *= mesh.shape[ax]
    return f


def sharding_report(logical_specs, shapes, rules, mesh: Mesh) -> dict:
    """What the rules did to each parameter: rows of (path, shape, mesh spec, bytes per
    device), the mesh axes dropped because they do not divide a dimension, and the fraction
    of parameter bytes the preset meant to shard that ended up replicated on some axis."""
    table = dict(rules)
    rows, drops = [], []
    total = meant_but_replicated = 0
    flat_specs = jax.tree_util.tree_flatten_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, P))[0]
    for (path, names), shape in zip(flat_specs, jax.tree.leaves(shapes)):
        spec, dropped = _map_spec(names, shape.shape, table, mesh)
        nbytes = int(np.prod(shape.shape)) * np.dtype(shape.dtype).itemsize
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        rows.append((name, tuple(shape.shape), spec, nbytes // _shard_factor(spec, mesh)))
        total += nbytes
        if dropped:
            meant_but_replicated += nbytes
            drops += [f"{name}: dim {i} ({n}={d}) not divisible by mesh {ax}={mesh.shape[ax]}"
                      for i, n, ax, d in dropped]
    return {"rows": rows, "dropped": drops, "total_bytes": total,
            "replicated_fraction": meant_but_replicated / max(total, 1),
            "bytes_per_device": sum(r[3] for r in rows)}


def idle_mesh_axes(rules, mesh: Mesh) -> list[str]:
    """Mesh axes of size > 1 that no rule uses: every device along them does the same work."""
    used = set(BATCH_AXES)
    for _, axes in rules:
        used.update(axes or ())
    return [ax for ax in mesh.axis_names if mesh.shape[ax] > 1 and ax not in used]
