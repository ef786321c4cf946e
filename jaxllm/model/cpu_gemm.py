"""model.matmul=blas: the step's fp32 matmuls on CPU through OpenBLAS's sgemm.

Why: on CPUs without bf16 hardware (AVX2 only) fp32 is the fastest mode, and the step is
GEMM-bound; XLA's own fp32 GEMMs (YNNPACK) ran 0.80-0.95x OpenBLAS's at the step's shapes, and
most slowly in the backward's weight-gradient layout (benchmarks/bench_vs_torch.py has the
figures). No XLA flag changes which kernel XLA picks, so the dot leaves XLA: an XLA FFI custom
call (kernels/cpu_sgemm.cc) calls `cblas_sgemm` of the scipy-openblas32 wheel (the `cpublas`
extra), with transpose flags, so the backward's x^T g and g w^T read the operands in place.
Two kinds of call: `sgemm` for the projections and the LM head (model/matmul.py routes them),
and a strided batched sgemm for attention's two einsums and their gradients, which reads q, k,
v and the scores in their natural layouts (`attention_scores`, `attention_values`).

The kernel is compiled on first use with the C++ compiler (g++, or $CXX) against jaxlib's FFI
headers, into ~/.cache/jaxllm (or $JAXLLM_CACHE), keyed by the source, jaxlib and OpenBLAS; a
missing compiler or wheel is one line of error (BlasUnavailable, a UserError). Limits, each
refused in one line rather than run slowly: CPU backend only, fp32 operands only, one device
(XLA's partitioner cannot split a custom call, it would gather every operand onto each device).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import UserError

TARGET = "jaxllm_cpu_sgemm"
TARGET_BATCHED = "jaxllm_cpu_batched_sgemm"
_SOURCE = pathlib.Path(__file__).parent / "kernels" / "cpu_sgemm.cc"


class BlasUnavailable(UserError):
    """model.matmul=blas cannot run here (no compiler, no OpenBLAS wheel, not a CPU)."""


def _openblas():
    try:
        import scipy_openblas32
    except ImportError as e:
        raise BlasUnavailable("model.matmul=blas needs the scipy-openblas32 wheel: "
                              "pip install 'jaxllm[cpublas]' (or leave model.matmul=xla)") from e
    return scipy_openblas32


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("JAXLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxllm")
    return pathlib.Path(root) / "cpu_gemm"


def _build() -> pathlib.Path:
    """Compile the kernel once per (source, jaxlib, OpenBLAS); later calls reuse the file."""
    ob = _openblas()
    inc_jax, inc_ob, lib_ob = jax.ffi.include_dir(), ob.get_include_dir(), ob.get_lib_dir()
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, jax.lib.__version__.encode(), lib_ob.encode(),
                                     ob.__version__.encode()])).hexdigest()[:16]
    out = _cache_dir() / f"libjaxllm_sgemm-{key}.so"
    if out.exists():
        return out
    wanted = os.environ.get("CXX")
    cxx = shutil.which(wanted) if wanted else (shutil.which("g++") or shutil.which("c++"))
    if not cxx:
        raise BlasUnavailable(f"model.matmul=blas compiles a small C++ kernel on first use and found no "
                              f"C++ compiler ({f'$CXX={wanted}' if wanted else 'g++ or $CXX'}); install one "
                              f"or leave model.matmul=xla")
    # Compile to a temporary name, then rename: concurrent first uses (test workers, hosts on
    # a shared home) each build their own file and the rename is atomic.
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{inc_jax}", f"-I{inc_ob}",
               str(_SOURCE), "-o", tmp, f"-L{lib_ob}", f"-l{ob.get_library()}", f"-Wl,-rpath,{lib_ob}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            errors = [ln for ln in res.stderr.splitlines() if "error" in ln] or [f"exit {res.returncode}"]
            raise BlasUnavailable(f"model.matmul=blas: compiling {_SOURCE.name} failed ({cxx}): "
                                  f"{errors[0].strip()}")
        os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise BlasUnavailable(f"model.matmul=blas: could not build its kernel in {out.parent}: {e} "
                              f"(set $JAXLLM_CACHE to a writable folder)") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _register() -> None:
    check_mesh(None)
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxllmSgemm), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_BATCHED, jax.ffi.pycapsule(lib.JaxllmBatchedSgemm), platform="cpu")


def check_mesh(mesh) -> None:
    """Refuse a mesh this kernel cannot run on: before a run writes anything, and at trace time."""
    if jax.default_backend() != "cpu":
        raise BlasUnavailable(f"model.matmul=blas is a CPU kernel; the backend here is "
                              f"{jax.default_backend()}: leave model.matmul=xla")
    if mesh is not None and not mesh.empty and mesh.size > 1:
        raise BlasUnavailable(f"model.matmul=blas runs on one device, the mesh here has {mesh.size} "
                              f"({dict(mesh.shape)}): set mesh.devices=1 or leave model.matmul=xla")


def _check_one_device() -> None:
    check_mesh(jax.sharding.get_abstract_mesh())


def sgemm(a, b, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) for 2-D fp32 arrays, op = transpose when trans_*; OpenBLAS on the host."""
    _register()
    _check_one_device()
    if a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise BlasUnavailable(f"model.matmul=blas multiplies 2-D float32 arrays, got {a.dtype}{a.shape} "
                              f"and {b.dtype}{b.shape}: set model.compute_dtype=float32 or model.matmul=xla")
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb:
        raise ValueError(f"sgemm: contracting sizes differ: {a.shape}{'^T' * trans_a} @ {b.shape}{'^T' * trans_b}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, trans_a=np.int32(trans_a), trans_b=np.int32(trans_b))


def blas_matmul_fwd(x, w, n_in: int):
    """x (..., *in) @ w (*in, *out) -> (..., *out), as one (M, K) @ (K, N) sgemm."""
    lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    if x.shape[x.ndim - n_in:] != ins:   # equal products would reshape into a wrong product
        raise ValueError(f"blas matmul: x {x.shape} does not end in w's input dims {ins}")
    k, n = int(np.prod(ins)), int(np.prod(outs))
    y = sgemm(x.reshape(-1, k), w.reshape(k, n))
    return y.reshape(*lead, *outs)


def blas_matmul_bwd(x, w, n_in: int, g):
    """(dx, dw) of blas_matmul_fwd: dx = g w^T, dw = x^T g, both as sgemms with transpose flags."""
    ins, outs = w.shape[:n_in], w.shape[n_in:]
    k, n = int(np.prod(ins)), int(np.prod(outs))
    x2, w2, g2 = x.reshape(-1, k), w.reshape(k, n), g.reshape(-1, n)
    dx = sgemm(g2, w2, trans_b=True).reshape(x.shape)
    dw = sgemm(x2, g2, trans_a=True).reshape(w.shape)
    return dx, dw


# --- attention's two einsums, in their natural layouts -------------------------------------
# q (B, T, K, G, H) grouped per kv head, k/v (B, S, K, H), scores/probs (B, K, G, T, S),
# out (B, T, K, G, H). Each einsum is a batch of (B, K, G) small GEMMs whose operands are
# strided views of those arrays (a row of q[b, :, kv, g, :] is K*G*H floats from the next), so
# nothing is transposed or copied: the leading dimensions carry the layout.

def _last(rows: int, cols: int, ld: int, strides, nb) -> int:
    """Index of the last element a strided batch of (rows, cols) matrices touches."""
    return sum((n - 1) * s for n, s in zip(nb, strides)) + (rows - 1) * ld + cols - 1


def _batched(a, b, out_shape, m, n, k, lda, ldb, ldc, nb, a_s, b_s, c_s, ta=False, tb=False,
             sum_inner=False):
    """C[i] (+)= op(A[i]) @ op(B[i]) over the batch index i = (i0, i1, i2) (kernels/cpu_sgemm.cc)."""
    _register()
    _check_one_device()
    # The kernel trusts these strides: check every product stays inside its buffer (raised,
    # not asserted, so python -O keeps the check).
    for name, x, (rows, cols), ld, st in (("a", a, (k, m) if ta else (m, k), lda, a_s),
                                          ("b", b, (n, k) if tb else (k, n), ldb, b_s),
                                          ("out", jax.ShapeDtypeStruct(out_shape, jnp.float32), (m, n), ldc, c_s)):
        if x.dtype != jnp.float32 or _last(rows, cols, ld, st, nb) >= int(np.prod(x.shape)):
            raise ValueError(f"batched sgemm: {name} {x.dtype}{x.shape} cannot hold {nb} strided "
                             f"({rows}, {cols}) float32 matrices (ld {ld}, strides {st})")
    call = jax.ffi.ffi_call(TARGET_BATCHED, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")
    return call(a, b, dims=np.array([m, n, k, lda, ldb, ldc, *nb], np.int64),
                strides=np.array([*a_s, *b_s, *c_s], np.int64), trans_a=np.int32(ta),
                trans_b=np.int32(tb), sum_inner=np.int32(sum_inner))


def _same(what: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"blas attention: {what} has shape {tuple(got)}, expected {tuple(want)}")


def _qk(q, k):
    """scores (B, K, G, T, S) = einsum('btkgh,bskh->bkgts', q, k)."""
    B, T, K, G, H = q.shape
    S = k.shape[1]
    _same("k", k.shape, (B, S, K, H))
    return _batched(q, k, (B, K, G, T, S), T, S, H, K * G * H, K * H, S, (B, K, G),
                    (T * K * G * H, G * H, H), (S * K * H, H, 0), (K * G * T * S, G * T * S, T * S), tb=True)


def _pv(p, v):
    """out (B, T, K, G, H) = einsum('bkgts,bskh->btkgh', p, v)."""
    B, K, G, T, S = p.shape
    H = v.shape[-1]
    _same("v", v.shape, (B, S, K, H))
    return _batched(p, v, (B, T, K, G, H), T, H, S, S, K * H, K * G * H, (B, K, G),
                    (K * G * T * S, G * T * S, T * S), (S * K * H, H, 0), (T * K * G * H, G * H, H))


def _pt_x(p, x):
    """(B, S, K, H) = einsum('bkgts,btkgh->bskh', p, x): the sum over the G heads of a group."""
    B, K, G, T, S = p.shape
    H = x.shape[-1]
    _same("x", x.shape, (B, T, K, G, H))
    return _batched(p, x, (B, S, K, H), S, H, T, S, K * G * H, K * H, (B, K, G),
                    (K * G * T * S, G * T * S, T * S), (T * K * G * H, G * H, H), (S * K * H, H, 0),
                    ta=True, sum_inner=True)


@jax.custom_vjp
def attention_scores(q, k):
    """einsum('btkgh,bskh->bkgts', q, k) in fp32 through OpenBLAS (model.matmul=blas)."""
    return _qk(q, k)


def _scores_fwd(q, k):
    return _qk(q, k), (q, k)


def _scores_bwd(res, ds):
    q, k = res
    return _pv(ds, k), _pt_x(ds, q)          # dq = dS k, dk = sum_g dS^T q


attention_scores.defvjp(_scores_fwd, _scores_bwd)


@jax.custom_vjp
def attention_values(p, v):
    """einsum('bkgts,bskh->btkgh', p, v) in fp32 through OpenBLAS (model.matmul=blas)."""
    return _pv(p, v)


def _values_fwd(p, v):
    return _pv(p, v), (p, v)


def _values_bwd(res, dout):
    p, v = res
    return _qk(dout, v), _pt_x(p, dout)      # dp = dout v^T, dv = sum_g p^T dout


attention_values.defvjp(_values_fwd, _values_bwd)
