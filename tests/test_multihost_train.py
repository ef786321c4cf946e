"""Two local processes (jax.distributed over gloo, 4 CPU devices each) train exactly like one
process with 8 devices: the same global batches, the same losses."""
import os
import pathlib
import socket
import subprocess

import numpy as np
import pytest

import jaxllm
from jaxllm.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["model=tiny", "train.steps=4", "train.batch_size=8", "train.seq_len=64", "train.log_every=1",
        "train.eval_every=0", "train.progress=false", "mesh.fsdp=8", "optim.warmup_steps=0",
        "optim.lr=1e-3", "checkpoint.every=2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one = jaxllm.train(jaxllm.load_config(None, ARGS + [f"train.run_dir={tmp_path}/one"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny\n")
    env = dict(os.environ, N="2", DEVICES="4", PORT=str(free_port()))
    out = subprocess.run(["bash", str(REPO / "launch/local_multiprocess.sh"), str(recipe), *ARGS,
                          f"train.run_dir={tmp_path}/two"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    two = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r}
    ref = {h["step"]: h["loss"] for h in one["history"]}
    assert sorted(two) == sorted(ref) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[k] for k in sorted(two)], [ref[k] for k in sorted(ref)], rtol=1e-5)
    # both processes wrote their part of the last checkpoint (grain state is per process)
    last = tmp_path / "two" / "checkpoints" / "4"
    assert last.exists() and len(list((last / "data").glob("*"))) >= 2
