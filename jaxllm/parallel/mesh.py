"""The device mesh, from config. Axes: data (pure replicas), fsdp (ZeRO-3 shards), tensor."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxllm.config import MeshConfig
from jaxllm.configlib import ConfigError
from jaxllm.parallel.axes import BATCH_AXES  # noqa: F401
from jaxllm.parallel.axes import MESH_AXES as AXES


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 (fill) and check the product against the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got data={cfg.data}, "
                          f"fsdp={cfg.fsdp}, tensor={cfg.tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if fills:
        if n_devices % fixed:
            raise ConfigError(f"mesh {dict(zip(AXES, sizes))} does not fit {n_devices} devices: "
                              f"{n_devices} is not divisible by {fixed}")
        sizes[fills[0]] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but "
                          f"{n_devices} are available; make the product equal {n_devices} "
                          f"or set one axis to -1")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    # Auto axis types: sharding follows the logical rules through GSPMD (jax 0.10 defaults to
    # Explicit, which would demand explicit shardings on every op).
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)
