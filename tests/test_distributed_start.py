"""jax.distributed start-up from config: what is passed to jax.distributed.initialize (the
call itself is recorded, not made: a real one needs peers; test_multihost_train.py runs them)."""
import jax
import pytest

from jaxllm.config import DistributedConfig
from jaxllm.configlib import ConfigError
from jaxllm.parallel import distributed


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: seen.append((a, k)))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    monkeypatch.setattr(distributed, "_initialized", False)
    return seen


def test_explicit_coordinator_passes_timeouts_and_device_ids(calls):
    cfg = DistributedConfig(coordinator="10.0.0.1:1234", num_processes=4, process_id=2,
                            local_device_ids=(0, 1), heartbeat_timeout_s=15)
    assert distributed.initialize(cfg)
    (args, kw), = calls
    assert args == ("10.0.0.1:1234",) and kw["num_processes"] == 4 and kw["process_id"] == 2
    assert kw["local_device_ids"] == (0, 1) and kw["heartbeat_timeout_seconds"] == 15
    assert kw["initialization_timeout"] == 300 and kw["shutdown_timeout_seconds"] == 300


def test_slurm_one_process_per_node_lists_its_gpus(calls, monkeypatch):
    # JAX's SLURM detection alone would give each process only GPU $SLURM_LOCALID
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert distributed.initialize(DistributedConfig(local_device_ids=(0, 1, 2, 3)))
    (args, kw), = calls
    assert args == () and kw["local_device_ids"] == (0, 1, 2, 3) and kw["heartbeat_timeout_seconds"] == 100
    calls.clear()
    monkeypatch.setattr(distributed, "_initialized", False)
    distributed.initialize(DistributedConfig())           # one process per GPU: JAX decides
    assert calls[0][1]["local_device_ids"] is None


def test_no_cluster_no_call_and_bad_timeouts_refused(calls, monkeypatch):
    for v in ("SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(v, raising=False)
    assert not distributed.initialize(DistributedConfig()) and calls == []
    with pytest.raises(ConfigError, match="heartbeat_timeout_s must be >= 1"):
        DistributedConfig(heartbeat_timeout_s=0)


@pytest.mark.parametrize("processes, backend, cache, off", [
    (2, "cpu", "/cache", True), (1, "cpu", "/cache", False), (2, "gpu", "/cache", False), (2, "cpu", None, False)])
def test_a_multi_process_cpu_run_turns_the_compile_cache_off_in_one_line(calls, monkeypatch, capsys,
                                                                         processes, backend, cache, off):
    """Two local CPU processes loading their programs from a warm persistent cache hung in the
    first cross-process collective (jax 0.12.1, gloo; README, Multi-host): initialize turns the
    cache off there, and only there, and says so."""
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda *a: updates.append(a))
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(distributed, "_compile_cache", lambda: (cache, True))
    assert distributed.initialize(DistributedConfig(coordinator="127.0.0.1:1234", num_processes=processes,
                                                    process_id=0))
    assert (("jax_enable_compilation_cache", False) in updates) == off
    err = capsys.readouterr().err
    assert ("note: jax's compilation cache (/cache) is off for this run" in err) == off
