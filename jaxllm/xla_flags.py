"""XLA flags a model setting needs, set by the launcher before the backend starts.

model.dot_output=compute makes every matmul write the compute dtype (bf16). On CPU, XLA hands
such dots to oneDNN's AMX brgemm kernel (`ONEDNN_VERBOSE=1` shows `brg_matmul:avx10_1_512_amx`)
only with its oneDNN custom calls on and YNNPACK's dot fusions off (by default bf16 dots run
in YNNPACK, which has no AMX path; benchmarks/bench_vs_torch.py measures both GEMM peaks in one
run, README). The flags are for the CPU backend; a GPU/TPU backend ignores them.

Only from jax 0.12: jaxlib 0.10's oneDNN (v3.7) takes such dots under the same flags but runs
them as fp32 GEMMs (`gemm_api ... src_f32`, measured), slower than YNNPACK; there the flags are
not set and the launcher says so (and that the setting itself is then slower: the 25m bf16 step
ran 1,055 / 1,171 tok/s against 2,383 / 1,989 with fp32 dot outputs, jax 0.10.2, interleaved).
jax 0.11 was not measured.

Only on a CPU with AMX (`amx_bf16` in /proc/cpuinfo), the only kind where they were measured
faster. On an AMD EPYC with AVX2 only, oneDNN runs these dots as fp32 GEMMs (`brg_matmul:avx2
... src:f32`), and the 25m step with the flags was no faster than without (701 vs 683 tok/s,
interleaved) while float32 compute beat both (787): there the flags are not set and the launcher
says so. A CPU with AVX512-BF16 but no AMX was not measured. A GPU/TPU host gets the same
line; its accelerator backend is not affected (the flags are the CPU backend's).

The flags are read once, when the backend starts, and act on every computation of the
process. So they are set here (never by tests), and a process whose backend is already up is
told in one line that they did not apply. A flag the user already set in XLA_FLAGS is kept.
"""
from __future__ import annotations

import os

from jaxllm.config import ModelConfig

# YNNPACK keeps the reductions (RMSNorm, the log-partition): with its fusions off altogether
# they fall to XLA's own reduce-window loops, 8x slower on a (2048, 4096) row sum (1.7-2.0 ms
# with `reduce` vs 15.8-16.6, measured), while the dots still go to oneDNN.
AMX_DOTS = {"--xla_cpu_experimental_onednn_custom_call": "true",
            "--xla_cpu_experimental_ynn_fusion_type": "reduce"}


def wanted(model: ModelConfig) -> dict[str, str]:
    """The flags (name -> value) this model setting needs."""
    return dict(AMX_DOTS) if model.dot_output == "compute" else {}


def _set_names(xla_flags: str) -> set[str]:
    return {f.split("=", 1)[0] for f in xla_flags.split() if f.startswith("--")}


MIN_JAX = (0, 12)


def _jax_version() -> tuple[int, ...]:
    import jax
    return tuple(int(p) for p in jax.__version__.split(".")[:2])


def cpu_features() -> set[str]:
    """This host CPU's feature flags (Linux /proc/cpuinfo `flags`); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _backend_started() -> bool:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def apply(model: ModelConfig, environ=None) -> str | None:
    """Add the flags `model` needs to XLA_FLAGS; returns the one line to print (None: none needed)."""
    environ = os.environ if environ is None else environ
    flags = wanted(model)
    if not flags:
        return None
    if _jax_version() < MIN_JAX:
        import jax
        return (f"XLA flags: not set for model.dot_output=compute: jax {jax.__version__}'s oneDNN runs "
                f"bf16 dots as fp32 GEMMs, and without it bf16-output dots are slower (the 25m bf16 step "
                f"~2x slower on jax 0.10.2); oneDNN's AMX kernel is reached from jax "
                f"{'.'.join(map(str, MIN_JAX))} (Python >= 3.12)")
    if "amx_bf16" not in cpu_features():
        return ("XLA flags: not set for model.dot_output=compute: this CPU has no AMX (amx_bf16), where "
                "oneDNN runs bf16 dots as fp32 GEMMs (no gain measured on AVX2); on such a CPU "
                "model.compute_dtype=float32 is the faster CPU step (README; a GPU/TPU backend is unaffected)")
    current = environ.get("XLA_FLAGS", "")
    mine = {k: v for k, v in flags.items() if k not in _set_names(current)}
    kept = sorted(set(flags) - set(mine))
    kept_note = f"; kept your {', '.join(kept)}" if kept else ""
    if not mine:
        return f"XLA flags: model.dot_output=compute; XLA_FLAGS already sets {', '.join(kept)}"
    added = " ".join(f"{k}={v}" for k, v in mine.items())
    if _backend_started():
        return (f"XLA flags: NOT applied ({added}): the XLA backend had already started, so "
                "model.dot_output=compute runs without oneDNN's AMX dots on CPU; set XLA_FLAGS "
                "before the first computation to get them")
    environ["XLA_FLAGS"] = f"{current} {added}".strip()
    return f"XLA flags: added {added} (model.dot_output=compute: bf16 dots to oneDNN's AMX kernel on CPU){kept_note}"


# CPU features with bf16 dot instructions (AMX tiles; AVX512-BF16's dot product).
BF16_HARDWARE = {"amx_bf16", "avx512_bf16"}


def cpu_dtype_note(model: ModelConfig, backend: str) -> str | None:
    """One line for a 16-bit compute dtype on a CPU backend whose CPU has no bf16 instructions:
    there the step is slower than in fp32 (measured on an AVX2-only AMD EPYC, README), and
    the user chose the dtype for speed. None where that does not apply or the CPU is unknown."""
    if backend != "cpu" or model.compute_dtype == "float32":
        return None
    feats = cpu_features()
    if not feats or feats & BF16_HARDWARE:
        return None
    return (f"model.compute_dtype={model.compute_dtype} on a CPU without bf16 instructions (no "
            f"{' / '.join(sorted(BF16_HARDWARE))}): the step is slower here than with float32 "
            f"(25m: 0.78-0.89x float32's tokens/s on an AVX2 AMD EPYC; README)")
