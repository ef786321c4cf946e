"""model.matmul=blas: the step's fp32 matmuls on CPU through OpenBLAS's sgemm.

Why: on CPUs without bf16 hardware (AVX2 only) fp32 is the fastest mode, and the step is
GEMM-bound; XLA's own fp32 GEMMs (YNNPACK) ran 0.80-0.95x OpenBLAS's at the step's shapes, and
most slowly in the backward's weight-gradient layout (benchmarks/bench_vs_torch.py has the
figures). No XLA flag changes which kernel XLA picks, so the dot leaves XLA: an XLA FFI custom
call (kernels/cpu_sgemm.cc) calls `cblas_sgemm` of the scipy-openblas32 wheel (the `cpublas`
extra), with transpose flags, so the backward's x^T g and g w^T read the operands in place.
Two kinds of call: `sgemm` for the projections and the LM head (model/matmul.py routes them),
and fused attention (`fused_attention`, kernels/cpu_attention.cc), forward and backward: its
GEMMs are sgemms over q/k/v in place, the mask and softmax run beside them block by block,
key blocks no query of a block may see are skipped, and the backward recomputes the
probabilities from the saved log-sum-exp (flash attention's recipe on CPU).

The kernels are compiled on first use with the C++ compiler (g++, or $CXX) against jaxlib's
FFI headers, into ~/.cache/jaxllm (or $JAXLLM_CACHE), keyed by the sources, jaxlib, OpenBLAS and
the CPU's features (they are built with -march=native); a
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
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxllm.errors import UserError

TARGET = "jaxllm_cpu_sgemm"
TARGET_ATTENTION_FWD = "jaxllm_cpu_attention_fwd"
TARGET_ATTENTION_BWD = "jaxllm_cpu_attention_bwd"
_KERNELS = pathlib.Path(__file__).parent / "kernels"
_SOURCES = ("cpu_sgemm.cc", "cpu_attention.cc")    # one library; parallel_for.h is shared


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


def _cpu_id() -> bytes:
    """The CPU's feature flags (the kernel is built with -march=native)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".encode()


def _build() -> pathlib.Path:
    """Compile the kernels once per (sources, jaxlib, OpenBLAS, CPU); later calls reuse the file."""
    ob = _openblas()
    inc_jax, inc_ob, lib_ob = jax.ffi.include_dir(), ob.get_include_dir(), ob.get_lib_dir()
    files = [_KERNELS / f for f in (*_SOURCES, "parallel_for.h")]
    key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in files), jax.lib.__version__.encode(),
                                     lib_ob.encode(), ob.__version__.encode(), _cpu_id()])).hexdigest()[:16]
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
        # -march=native: the attention kernel's exp and mask loops vectorise for this CPU (the
        # cache key holds the CPU's feature flags, so a shared home never loads it elsewhere);
        # -fno-trapping-math lets them (selects on float compares), results are unchanged
        cmd = [cxx, "-O3", "-march=native", "-fno-trapping-math", "-fopenmp-simd", "-std=c++17", "-shared",
               "-fPIC", "-w", f"-I{inc_jax}", f"-I{inc_ob}", f"-I{_KERNELS}", *(str(_KERNELS / f) for f in _SOURCES),
               "-o", tmp, f"-L{lib_ob}", f"-l{ob.get_library()}", f"-Wl,-rpath,{lib_ob}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            errors = [ln for ln in res.stderr.splitlines() if "error" in ln] or [f"exit {res.returncode}"]
            raise BlasUnavailable(f"model.matmul=blas: compiling {', '.join(_SOURCES)} failed ({cxx}): "
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
    jax.ffi.register_ffi_target(TARGET_ATTENTION_FWD, jax.ffi.pycapsule(lib.JaxllmAttentionFwd), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_ATTENTION_BWD, jax.ffi.pycapsule(lib.JaxllmAttentionBwd), platform="cpu")


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


def _same(what: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"blas attention: {what} has shape {tuple(got)}, expected {tuple(want)}")


# --- fused attention (kernels/cpu_attention.cc) ----------------------------------------------

# Parts the backward splits each kv head's work into (summed afterwards): 0 lets the kernel
# pick from XLA's pool size (more parts only when batch x kv heads leave threads idle). Tests
# set it to check the split sums on a machine of any size.
BACKWARD_SPLITS = 0

def _attention_operands(q, k, v, masks):
    B, T, K, G, H = q.shape
    S = k.shape[1]
    _same("k", k.shape, (B, S, K, H))
    _same("v", v.shape, (B, S, K, H))
    for what, x, n in zip(("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids"), masks, (T, S, T, S)):
        _same(what, x.shape, (B, n))
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"blas attention: {what} must be integers, got {x.dtype}")
    if S == 0:
        raise ValueError("blas attention: no keys to attend to (S = 0)")
    if any(x.dtype != jnp.float32 for x in (q, k, v)):
        raise BlasUnavailable(f"model.matmul=blas attention runs float32, got {q.dtype}/{k.dtype}/{v.dtype}")
    _register()
    _check_one_device()
    return [x.astype(jnp.int32) for x in masks]


def _fused_fwd_call(q, k, v, masks, causal: bool):
    B, T, K, G, H = q.shape
    masks = _attention_operands(q, k, v, masks)
    call = jax.ffi.ffi_call(TARGET_ATTENTION_FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                   jax.ShapeDtypeStruct((B, K, G, T), jnp.float32)),
                            vmap_method="sequential")
    return call(q, k, v, *masks, causal=np.int32(causal), scale=np.float32(H ** -0.5))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_attention(q, k, v, masks, causal: bool):
    """softmax(q k^T / sqrt(H) + mask) v for q (B, T, K, G, H), k/v (B, S, K, H) in fp32, one
    custom call each way (kernels/cpu_attention.cc). masks = (q_positions (B, T), kv_positions
    (B, S), q_segment_ids (B, T), kv_segment_ids (B, S)), int32: a query sees a key of its own
    segment at a position <= its own (any position when not causal)."""
    return _fused_fwd_call(q, k, v, masks, causal)[0]


def _fused_fwd(q, k, v, masks, causal):
    out, lse = _fused_fwd_call(q, k, v, masks, causal)
    # named for remat=dots: the backward needs out and lse, and recomputing them is the call
    out, lse = checkpoint_name(out, "attention_dot"), checkpoint_name(lse, "attention_dot")
    return out, (q, k, v, masks, out, lse)


def _fused_bwd(causal, res, dout):
    q, k, v, masks, out, lse = res
    masks = _attention_operands(q, k, v, masks)
    call = jax.ffi.ffi_call(TARGET_ATTENTION_BWD, tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
                            vmap_method="sequential")
    dq, dk, dv = call(q, k, v, out, lse, dout.astype(jnp.float32), *masks, causal=np.int32(causal),
                      scale=np.float32(q.shape[-1] ** -0.5), splits=np.int32(BACKWARD_SPLITS))
    return dq, dk, dv, None


fused_attention.defvjp(_fused_fwd, _fused_bwd)
