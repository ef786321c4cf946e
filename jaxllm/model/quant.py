"""A quantized frozen base for LoRA (QLoRA, Dettmers et al. 2023): the layers' matrices kept as
int8 or 4-bit NormalFloat codes with one fp32 absmax scale per block, dequantized to the compute
dtype inside each matmul (model/transformer.py Dense). Only the base is quantized; the LoRA
delta, the embedding, the norms and the LM head keep their dtypes.

    base = quantize_tree(base, "nf4", block=64)      # every layers/*/kernel -> QuantizedKernel
    params = lora.attach(base, delta, lora_cfg)     # the model reads it like a kernel

Blocks run along a kernel's LAST INPUT dim (d_model for q/k/v/gate/up, head_dim for o, d_ff for
down), `block` values each (gcd(block, dim) where the dim is smaller or not a multiple), for every
index of the other dims. So codes and scales keep the kernel's rank and axis order, and shard
with the kernel's logical names (logical_axes). nf4 packs two codes per byte along that dim:
0.5 + 4/block bytes per parameter (QLoRA also quantizes the scales, "double quantization";
not done here: at block 64 the fp32 scales cost 0.5 bit per parameter). int8: 1 + 4/block.
Our own rather than qwix: a dozen lines of jnp that work under the existing nn.scan, jit and
sharding, with no new dependency.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# QLoRA's NF4 levels (bitsandbytes' table): quantiles of N(0, 1) scaled to [-1, 1], with 0 exact.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
KINDS = ("int8", "nf4")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A kernel (..., *in_dims, *out_dims) as codes + per-block scales. `n_out` counts the output
    dims, so the blocked axis (the last input dim, ndim - n_out - 1) is found the same way in a
    kernel stacked on `layers` and in one layer's slice of it (nn.scan / lax.scan slice leaves)."""
    codes: jax.Array      # int8: the kernel's shape; nf4: uint8, blocked dim halved (2 codes a byte)
    scale: jax.Array      # float32: the kernel's shape with the blocked dim divided by the block
    kind: str = dataclasses.field(metadata=dict(static=True))
    n_out: int = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))   # the original kernel's dtype

    @property
    def axis(self) -> int:
        return self.codes.ndim - self.n_out - 1

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.codes.shape)
        if self.kind == "nf4":
            s[self.axis] *= 2
        return tuple(s)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def block_size(dim: int, block: int) -> int:
    """The block actually used along a dim of `dim` values."""
    return math.gcd(block, dim)


def _blocked(x: jax.Array, axis: int, b: int) -> jax.Array:
    """(..., D, ...) -> (..., D // b, b, ...)."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] // b, b) + x.shape[axis + 1:])


@functools.partial(jax.jit, static_argnames=("kind", "n_out", "block"))   # one program, not one per op
def quantize(w: jax.Array, kind: str, n_out: int, block: int = 64) -> QuantizedKernel:
    """Absmax-quantize w per block of its last input dim. int8: round(x / absmax * 127);
    nf4: the nearest of NF4_LEVELS to x / absmax."""
    if kind not in KINDS:
        raise ValueError(f"quantization kind {kind!r}: expected one of {KINDS}")
    axis = w.ndim - n_out - 1
    dim = w.shape[axis]
    b = block_size(dim, block)
    if kind == "nf4" and dim % 2:
        raise ValueError(f"nf4 packs two codes per byte along a kernel's last input dim; {w.shape} has "
                         f"{dim} there (odd)")
    x = _blocked(w.astype(jnp.float32), axis, b)                      # (..., D/b, b, ...)
    absmax = jnp.max(jnp.abs(x), axis=axis + 1, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    y = (x / safe).reshape(w.shape)                                   # in [-1, 1]
    if kind == "int8":
        codes, scale = jnp.round(y * 127).astype(jnp.int8), absmax / 127
    else:
        levels = jnp.asarray(NF4_LEVELS, jnp.float32)
        idx = jnp.sum(y[..., None] > (levels[1:] + levels[:-1]) / 2, axis=-1).astype(jnp.uint8)
        pairs = _blocked(idx, axis, 2)                                # (..., D/2, 2, ...)
        lo = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
        hi = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
        codes, scale = lo | (hi << 4), absmax
    scale = jnp.squeeze(scale, axis + 1).astype(jnp.float32)          # (..., D/b, ...)
    return QuantizedKernel(codes, scale, kind, n_out, jnp.dtype(w.dtype).name)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(q: QuantizedKernel, dtype=jnp.float32) -> jax.Array:
    """The kernel the codes stand for, in `dtype` (scaled in fp32, then cast)."""
    axis = q.axis
    if q.kind == "int8":
        y = q.codes.astype(jnp.float32)
    else:
        lo, hi = q.codes & 0xF, q.codes >> 4
        idx = jnp.stack([lo, hi], axis=axis + 1).reshape(q.shape)     # re-interleave the pairs
        y = jnp.asarray(NF4_LEVELS, jnp.float32)[idx]
    dim = y.shape[axis]
    b = dim // q.scale.shape[axis]
    w = _blocked(y, axis, b) * jnp.expand_dims(q.scale, axis + 1)
    return w.reshape(q.shape).astype(dtype)


# ---------------------------------------------------------------------------- trees
def _targets():
    from jaxllm.model.lora import KERNEL_INPUT_DIMS
    return KERNEL_INPUT_DIMS


def _n_out(path: str, ndim: int) -> int:
    return ndim - 1 - _targets()[path]          # stacked: (layers, *in, *out)


def quantize_tree(params: dict, kind: str, block: int = 64) -> dict:
    """params with every layer matrix (lora.KERNEL_INPUT_DIMS) replaced by a QuantizedKernel.
    Works on arrays and, under jax.eval_shape, on ShapeDtypeStructs."""
    from jaxllm.model.lora import get_path, param_paths, set_path
    out = jax.tree.map(lambda x: x, params)
    for path in param_paths(params):
        if path in _targets():
            w = get_path(params, path)
            set_path(out, path, quantize(w, kind, _n_out(path, w.ndim), block))
    return out


def block_sizes(params: dict) -> dict[str, int]:
    """{kernel path: the block its QuantizedKernel was made with} (gcd(block, dim), see block_size)."""
    from jaxllm.model.lora import get_path, param_paths
    out = {}
    for path in param_paths(params):
        q = get_path(params, path)
        if isinstance(q, QuantizedKernel):
            out[path] = q.shape[q.axis] // q.scale.shape[q.axis]
    return out


def dequantize_tree(params: dict) -> dict:
    """The inverse view: every QuantizedKernel back to an array of its original dtype."""
    return jax.tree.map(lambda x: dequantize(x, x.dtype) if isinstance(x, QuantizedKernel) else x,
                        params, is_leaf=lambda x: isinstance(x, QuantizedKernel))


def logical_axes(specs: dict, quantized_shapes: dict) -> dict:
    """The logical PartitionSpecs of quantize_tree's result (quantized_shapes: its eval_shape)
    from the base's: codes keep the kernel's names (the packed / blocked dim is still that dim,
    fewer values); scales keep them too except the blocked dim, left unsharded (it is D / block
    long: 1/64 of the codes' entries at the default block)."""
    from jaxllm.model.lora import get_path, set_path
    out = jax.tree.map(lambda x: x, specs, is_leaf=lambda x: isinstance(x, P))
    for path in _targets():
        names = tuple(get_path(specs, path))
        axis = _targets()[path]                      # (layers, *in, *out): the last input dim
        scale_names = names[:axis] + (None,) + names[axis + 1:]
        set_path(out, path, dataclasses.replace(get_path(quantized_shapes, path),
                                                codes=P(*names), scale=P(*scale_names)))
    return out


def tree_nbytes(params) -> int:
    """Bytes of a params tree (arrays or ShapeDtypeStructs), quantized kernels at their packed size."""
    total = 0
    for x in jax.tree.leaves(params):
        total += int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    return total
