"""`jaxllm plan`: per-device memory of a config's step on simulated devices, and what each
memory saver changes in it (compile only; nothing is allocated or run)."""
import os
import pathlib
import subprocess
import sys

import pytest

from jaxllm.training.plan import measure

REPO = pathlib.Path(__file__).resolve().parent.parent
# deep, long and narrow, scanned, with the (B, heads, T, T) reference attention (the tiny preset's
# blockwise attention saves no scores): saved activations dominate the step's temporaries
BASE = ["model=tiny", "model.n_layers=4", "model.vocab_size=128", "train.batch_size=8",
        "train.seq_len=256", "model.attention=xla", "model.scan_layers=true"]


def test_plan_splits_params_and_state_over_the_mesh_and_each_saver_does_what_it_says():
    one = measure(None, BASE + ["mesh.devices=1"])
    fsdp = measure(None, BASE + ["mesh.fsdp=8"])
    assert fsdp["devices"] == 8 and one["devices"] == 1
    assert fsdp["params"] * 8 == pytest.approx(one["params"], rel=0.02)   # all but norms shard
    # AdamW: two fp32 moments per parameter (+ a few scalars)
    assert one["opt_state"] == pytest.approx(2 * one["params"], rel=0.01)
    bf16 = measure(None, BASE + ["mesh.devices=1", "optim.moment_dtype=bfloat16"])
    assert bf16["opt_state"] == pytest.approx(one["params"], rel=0.01)
    off = measure(None, BASE + ["mesh.devices=1", "optim.offload_state=true"])
    assert off["opt_state"] == 0 and off["opt_state_host"] == one["opt_state"]
    assert off["device_total"] == pytest.approx(one["device_total"] - one["opt_state"], rel=0.05)
    full = measure(None, BASE + ["mesh.devices=1", "model.remat=full"])
    assert full["temp"] < 0.5 * one["temp"]
    # the batch is split over the data-like axes
    assert fsdp["batch"] * 8 == one["batch"] == 4 * 8 * 256 * 4


@pytest.mark.slow
def test_plan_cli_prints_the_table_on_simulated_devices():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)            # the CLI sets the device count itself
    r = subprocess.run([sys.executable, "-m", "jaxllm.cli", "plan", "-", *BASE, "optim.grad_compression=bf16",
                        "--devices", "4", "--savers", "remat=full,offload opt state"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "(4 devices)" in r.stdout
    assert "note: optim.grad_compression=bf16 is not modelled" in r.stdout   # said, not silently planned
    for row in ("as configured", "remat=full", "offload opt state"):
        assert f"  {row}" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxllm.cli", "plan", "-", "--savers", "zram"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown ['zram']" in bad.stderr


def test_plan_cli_refuses_a_device_memory_that_is_not_a_positive_number(capsys, monkeypatch):
    from jaxllm.cli import main
    monkeypatch.setattr("jaxllm.training.plan.run_in_child", lambda *a: 0)   # no planning: the check comes first
    for gb in ("-1", "0", "nan"):
        assert main(["plan", "-", "--device-gb", gb]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--device-gb must be a positive number of GB" in err, err
