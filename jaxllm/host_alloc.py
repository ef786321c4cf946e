"""Keep XLA:CPU's per-execution buffers on warm pages (glibc only; the launcher calls this).

XLA:CPU allocates each execution's temporaries as one block with posix_memalign, from the
arena of the thread that runs it, and frees it when the execution ends. A train step's block
is hundreds of MB (25m at batch 8 x 256: ~790 MB faulted in per step), far above glibc's mmap threshold (at most
32 MB), so every step mmaps fresh pages, page-faults and zero-fills all of them, and munmaps
them again: measured 192k minor faults and 0.44 s of kernel time per 25m bf16 step on this
2-core CPU. A thread arena cannot serve such a block from its heap (64 MB at most), so only
glibc's main heap can keep it: with one arena, no mmap and no trimming, the freed block stays
in the heap and the next step reuses it: 0 faults per step once the heap has grown (by the
third step of a 25m step; the heap then holds about two step blocks, as small allocations in a
freed block's space can keep the next one from fitting), and 1.28x tokens/s (medians of an
interleaved A/B of the 25m bf16 step; README, Benchmarks).

The cost: the process keeps its peak heap (glibc never returns freed memory to the OS) and
all threads share one arena. Set JAXLLM_HOST_ALLOC=default to leave glibc as it is.
It must run before the backend starts its threads (before the first computation): their
arenas are chosen at their first allocation. Where a GPU/TPU plugin is installed (and
JAX_PLATFORMS is not "cpu") it does nothing: the step's buffers are then device memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform

from jaxllm.errors import UserError

# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ENV = "JAXLLM_HOST_ALLOC"

_done: str | None = None


def _accelerator_plugin() -> str | None:
    for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def status() -> str | None:
    """keep_pages()'s line, or None where it was not called (jaxllm used as a library)."""
    return _done


def keep_pages() -> str:
    """Configure glibc (once per process); returns one line saying what was done or why not."""
    global _done
    if _done is not None:
        return _done
    mode = os.environ.get(ENV, "keep")
    if mode not in ("keep", "default"):
        raise UserError(f"{ENV}={mode!r}: use 'keep' (the default: reuse warm pages) or 'default' (glibc as it is)")
    if mode == "default":
        _done = f"host allocator: glibc defaults ({ENV}=default)"
    elif (plugin := _accelerator_plugin()) and os.environ.get("JAX_PLATFORMS", "").lower() != "cpu":
        _done = (f"host allocator: unchanged ({plugin} is installed: the step's buffers "
                 "live on the accelerator, not in glibc's heap)")
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _done = f"host allocator: unchanged (not Linux glibc: {platform.system()} {platform.libc_ver()[0] or '?'})"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # -1 as the trim threshold is SIZE_MAX: never give the heap's top back (man 3 mallopt).
        ok = [libc.mallopt(p, v) for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))]
        if all(r == 1 for r in ok):
            _done = (f"host allocator: glibc main heap only, no mmap, no trim (XLA:CPU step buffers "
                     f"reuse warm pages; {ENV}=default turns this off)")
        else:
            _done = (f"host allocator: glibc mallopt refused a setting (arena_max, mmap_max, trim -> {ok}; "
                     "1 = applied): step buffers may still be mmapped per step")
    return _done
