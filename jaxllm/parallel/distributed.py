"""Multi-host start-up through jax.distributed: explicit, SLURM, or TPU pod / GKE.

Each process of a multi-host run executes the same command; this must run before anything
touches a JAX backend. With no coordinator configured and no cluster environment found it does
nothing (single process: a laptop, one GPU host, a test).
"""
from __future__ import annotations

import os
import sys

import jax

from jaxllm.config import DistributedConfig

_initialized = False


def _cluster_detected() -> bool:
    """True where jax.distributed.initialize() can find its peers by itself."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    return slurm or tpu_pod or "JAX_COORDINATOR_ADDRESS" in os.environ


def _timeouts(cfg: DistributedConfig) -> dict:
    return dict(heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                initialization_timeout=cfg.initialization_timeout_s,
                shutdown_timeout_seconds=cfg.shutdown_timeout_s)


def initialize(cfg: DistributedConfig) -> bool:
    """Initialise jax.distributed if configured or detected. Returns whether it did."""
    global _initialized
    if _initialized:
        return True
    if cfg.coordinator:
        if cfg.num_processes < 1 or not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(f"distributed.coordinator={cfg.coordinator} needs num_processes >= 1 and "
                             f"0 <= process_id < num_processes (got {cfg.num_processes}, {cfg.process_id})")
        # only affects CPU devices; must not query the backend before initialize()
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        jax.distributed.initialize(cfg.coordinator, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id,
                                   local_device_ids=cfg.local_device_ids or None, **_timeouts(cfg))
    elif cfg.auto and _cluster_detected():
        # SLURM / TPU pod / GKE: peers from the environment. Under SLURM, JAX gives each
        # process one GPU (SLURM_LOCALID) unless local_device_ids says otherwise: one process
        # per node must list its GPUs (launch/slurm_gpu.sbatch does).
        jax.distributed.initialize(local_device_ids=cfg.local_device_ids or None, **_timeouts(cfg))
    else:
        return False
    _initialized = True
    _no_compile_cache_on_cpu()
    return True


def _compile_cache() -> tuple[str | None, bool]:
    return jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache


def _no_compile_cache_on_cpu() -> None:
    """jax's persistent compilation cache off for a multi-process CPU run, said in one line.
    Measured (jax 0.12.1, 2 local processes over gloo): a run whose programs come from a warm
    cache hangs in its first cross-process collective, pretraining and RL alike, while the
    same run compiling them finishes. Without a cache a run compiles; it does not hang."""
    cache_dir, enabled = _compile_cache()
    if jax.process_count() > 1 and jax.default_backend() == "cpu" and cache_dir and enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        if jax.process_index() == 0:
            print(f"note: jax's compilation cache ({cache_dir}) is off for this run: "
                  f"on CPU with {jax.process_count()} processes, programs loaded from it hang in their first "
                  f"cross-process collective", file=sys.stderr, flush=True)
