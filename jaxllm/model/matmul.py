"""x @ w with low-precision operands and fp32 accumulation, in the forward AND backward pass.

Plain autodiff of `einsum(x_bf16, w_bf16, preferred_element_type=f32)` transposes into
matmuls of an fp32 cotangent with a bf16 operand, which XLA runs as fp32 matmuls (plus
converts). On CPUs with AVX512-BF16 (and on GPUs) bf16 operands with fp32 accumulation are the
fast path, so the backward here casts the cotangent to the operands' dtype and keeps fp32
accumulation: the usual mixed-precision recipe. For fp32 operands it is exactly autodiff.

`out_dtype` is the dtype the dot writes (model.dot_output). fp32 (the default) keeps logits
and scores unrounded. The operands' dtype (bf16) is torch autocast's numerics and, on CPU, the
only kind of dot XLA hands to oneDNN's AMX kernel (with the flags in jaxllm/xla_flags.py):
the kernel still accumulates in fp32 and rounds once at the end. The backward's dx and dw are
rounded to the operands' dtype either way, so there the choice changes only which kernel runs.

`kernel` (model.matmul): "xla" lets XLA pick the GEMM; "blas" sends fp32 dots, forward and
backward, to OpenBLAS through a custom call (model/cpu_gemm.py: CPUs without bf16 hardware).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.model import cpu_gemm

_LETTERS = "abcdefgh"


def _specs(n_in: int, n_out: int):
    i, o = _LETTERS[:n_in], _LETTERS[n_in:n_in + n_out]
    fwd = f"...{i},{i}{o}->...{o}"
    dx = f"...{o},{i}{o}->...{i}"
    dw = f"...{i},...{o}->{i}{o}"
    return fwd, dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def mixed_matmul(x, w, n_in: int, out_dtype=jnp.float32, kernel: str = "xla"):
    """x (..., *in) @ w (*in, *out) -> (..., *out) in out_dtype; x and w share one dtype."""
    if kernel == "blas":
        return cpu_gemm.blas_matmul_fwd(x, w, n_in)
    fwd, _, _ = _specs(n_in, w.ndim - n_in)
    return jnp.einsum(fwd, x, w, preferred_element_type=out_dtype)


def _fwd(x, w, n_in, out_dtype, kernel):
    return mixed_matmul(x, w, n_in, out_dtype, kernel), (x, w)


def _bwd(n_in, out_dtype, kernel, res, g):
    x, w = res
    if kernel == "blas":
        return cpu_gemm.blas_matmul_bwd(x, w, n_in, g.astype(jnp.float32))
    _, dx_spec, dw_spec = _specs(n_in, w.ndim - n_in)
    g = g.astype(x.dtype)
    # fp32 out: accumulate in fp32 and round to the operands' dtype here; otherwise the dot
    # writes that dtype itself (the same rounding, done by the kernel).
    acc = jnp.float32 if jnp.dtype(out_dtype) == jnp.float32 else x.dtype
    dx = jnp.einsum(dx_spec, g, w, preferred_element_type=acc).astype(x.dtype)
    dw = jnp.einsum(dw_spec, x, g, preferred_element_type=acc).astype(w.dtype)
    return dx, dw


mixed_matmul.defvjp(_fwd, _bwd)
