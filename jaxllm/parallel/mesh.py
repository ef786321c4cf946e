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


def _granules(devices) -> tuple[str, int]:
    """What the slow network (DCN) connects: TPU slices when the devices span several,
    else hosts (processes). -> (kind, how many)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        return "slice_index", len(slices)
    return "process_index", len({d.process_index for d in devices})


def dcn_shape(cfg: MeshConfig, devices) -> tuple[int, int, int]:
    """(data, fsdp, tensor) slices/hosts per axis; dcn_data=0 -> the number of TPU slices."""
    kind, n = _granules(devices)
    return (cfg.dcn_data or (n if kind == "slice_index" else 1)), cfg.dcn_fsdp, cfg.dcn_tensor


def hybrid_device_array(shape: tuple[int, ...], dcn: tuple[int, ...], devices) -> np.ndarray:
    """Devices laid out as `shape` where axis i is dcn[i] granules (slices or hosts) times
    shape[i] / dcn[i] devices inside one granule: collectives over an axis stay inside a
    granule's fast interconnect (ICI / NVLink) except across the dcn factor.
    jax's mesh_utils.create_hybrid_device_mesh does the layout (per-granule meshes tiled)."""
    from jax.experimental import mesh_utils
    for size, d, name in zip(shape, dcn, AXES):
        if size % d:
            raise ConfigError(f"mesh.{name}={size} is not divisible by mesh.dcn_{name}={d}: each "
                              f"slice/host must hold an equal part of the axis")
    kind, n = _granules(devices)
    if math.prod(dcn) != n:
        what = "TPU slices" if kind == "slice_index" else "hosts (processes)"
        raise ConfigError(f"mesh.dcn_data/dcn_fsdp/dcn_tensor = {dcn} ask for {math.prod(dcn)} "
                          f"slices or hosts, but the {len(devices)} devices span {n} {what}")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                process_is_granule=kind == "process_index")


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    # Auto axis types: sharding follows the logical rules through GSPMD (jax 0.10 defaults to
    # Explicit, which would demand explicit shardings on every op).
    dcn = dcn_shape(cfg, devices)
    if math.prod(dcn) > 1:
        return Mesh(hybrid_device_array(shape, dcn, devices), AXES, axis_types=(AxisType.Auto,) * 3)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)
