"""Two real JAX processes (jax.distributed over gloo) assemble the same global batches as one.

Each process reads only its own logical shards, builds its local rows, turns them into a
global jax.Array with to_global_batch on a mesh over both processes' devices, and all-gathers
it; process 0 writes what it gathered. The test compares that with a single-process run.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from jaxllm.data import pipeline, synthetic
from jaxllm.data.config import DataConfig

T, B, STEPS = 64, 8, 3

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from jax.experimental import multihost_utils
    from jaxllm.data import pipeline
    from jaxllm.data.config import DataConfig

    pid, port, cfg_json, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    cfg = DataConfig(**json.loads(cfg_json))
    # process_index/count come from jax.distributed.
    it = pipeline.make_train_iterator(cfg, seq_len=%(T)d, global_batch_size=%(B)d, seed=0)
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"), devices=jax.devices(),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    gathered = {}
    for step in range(%(STEPS)d):
        local = next(it)
        assert local["tokens"].shape == (%(B)d // 2, %(T)d)
        g = pipeline.to_global_batch(local, mesh)
        for k, v in g.items():
            gathered[f"{step}/{k}"] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
    it.close()
    if pid == 0:
        np.savez(out, **gathered)
    jax.distributed.shutdown()
""") % {"T": T, "B": B, "STEPS": STEPS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_assemble_the_same_global_batches_as_one(tmp_path):
    paths = synthetic.prepare_default_data(str(tmp_path / "synth"), train_docs=600, eval_docs=20,
                                           vocab_size=400, tasks=False)
    cfg_kw = {"kind": "text", "sources": [{"path": paths["train"]}], "tokenizer": paths["tokenizer"]}
    cfg = DataConfig(**cfg_kw)

    it = pipeline.make_train_iterator(cfg, seq_len=T, global_batch_size=B, seed=0, process_index=0,
                                      process_count=1)
    reference = [next(it) for _ in range(STEPS)]
    it.close()

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    port, out = _free_port(), tmp_path / "gathered.npz"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(port), json.dumps(cfg_kw), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    try:
        logs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    gathered = np.load(out)
    for step, ref in enumerate(reference):
        for k, v in ref.items():
            np.testing.assert_array_equal(gathered[f"{step}/{k}"], v, err_msg=f"step {step} {k}")
