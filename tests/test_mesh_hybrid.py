"""Hybrid ICI x DCN meshes (mesh.dcn_*): each axis is dcn granules (TPU slices, or hosts)
times a part inside one granule, so an axis's collectives cross the slow network only over
its dcn factor. Layouts are checked on stand-in device objects (slices and hosts exist only
on pods); the 2-process training equality is in test_multihost_train.py."""
import types

import jax
import numpy as np
import pytest

from jaxllm.config import MeshConfig
from jaxllm.configlib import ConfigError
from jaxllm.parallel.mesh import dcn_shape, hybrid_device_array, make_mesh


def hosts(n_devices=8, per_host=4):
    return [types.SimpleNamespace(id=i, process_index=i // per_host, platform="cpu", device_kind="cpu")
            for i in range(n_devices)]


def slices(n_devices=16, per_slice=8, per_host=4):
    """TPU-like: 2 slices of 2 hosts each."""
    return [types.SimpleNamespace(id=i, process_index=i // per_host, slice_index=i // per_slice,
                                  platform="cpu", device_kind="cpu") for i in range(n_devices)]


def granule(arr, attr="process_index"):
    return np.vectorize(lambda d: getattr(d, attr))(arr)


def test_each_axis_spans_its_dcn_factor_of_hosts():
    a = hybrid_device_array((2, 4, 1), (2, 1, 1), hosts())      # data across the 2 hosts
    assert a.shape == (2, 4, 1)
    np.testing.assert_array_equal(granule(a)[:, :, 0], [[0] * 4, [1] * 4])
    a = hybrid_device_array((1, 8, 1), (1, 2, 1), hosts())      # fsdp across the 2 hosts
    np.testing.assert_array_equal(granule(a)[0, :, 0], [0] * 4 + [1] * 4)
    a = hybrid_device_array((2, 2, 2), (1, 1, 2), hosts())      # tensor across hosts (legal, slow)
    np.testing.assert_array_equal(granule(a)[..., 0], 0)
    np.testing.assert_array_equal(granule(a)[..., 1], 1)
    assert sorted(d.id for d in a.ravel()) == list(range(8))    # every device once


def test_tpu_slices_are_the_granules_and_data_spans_them_by_default():
    devs = slices()
    assert dcn_shape(MeshConfig(), devs) == (2, 1, 1)           # dcn_data=0: auto = #slices
    a = hybrid_device_array((2, 8, 1), dcn_shape(MeshConfig(), devs), devs)
    np.testing.assert_array_equal(granule(a, "slice_index")[:, :, 0], [[0] * 8, [1] * 8])
    # hosts inside one slice stay on the fast axis
    assert set(granule(a)[0, :, 0]) == {0, 1} and set(granule(a)[1, :, 0]) == {2, 3}
    assert dcn_shape(MeshConfig(), hosts()) == (1, 1, 1)         # no slices: flat unless asked


def test_mismatched_dcn_shapes_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"ask for 4 slices or hosts, but the 8 devices span 2 hosts"):
        hybrid_device_array((4, 2, 1), (4, 1, 1), hosts())
    with pytest.raises(ConfigError, match="mesh.fsdp=3 is not divisible by mesh.dcn_fsdp=2"):
        hybrid_device_array((1, 3, 1), (1, 2, 1), hosts(6, 3))
    with pytest.raises(ConfigError, match="dcn_fsdp/dcn_tensor >= 1"):
        MeshConfig(dcn_fsdp=0)


def test_one_process_keeps_the_flat_mesh_and_refuses_a_dcn_axis():
    flat = make_mesh(MeshConfig(data=2, fsdp=4))
    assert flat.devices.shape == (2, 4, 1)
    assert sorted(d.id for d in flat.devices.ravel()) == sorted(d.id for d in jax.devices())
    with pytest.raises(ConfigError, match="span 1 hosts"):
        make_mesh(MeshConfig(data=2, fsdp=4, dcn_data=2))
