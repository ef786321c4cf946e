"""Run setup: config checks on resume, the lr horizon, params-only init_from, the run-dir
lock, corrupt checkpoints, bf16 parameters, eager debug mode, reruns of finished runs and
one-line CLI errors."""
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.training.checkpoint import CheckpointError

REPO = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["model=tiny", "train.batch_size=8", "train.seq_len=64", "train.log_every=1",
        "train.eval_every=0", "train.progress=false", "optim.warmup_steps=2", "mesh.devices=1",
        "checkpoint.async_save=false"]


def run(tmp, *overrides):
    return jaxllm.train(jaxllm.load_config(None, ARGS + [f"train.run_dir={tmp}", *overrides]))


def cli(*argv, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "jaxllm.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=600)


@pytest.mark.slow
def test_resume_refuses_a_trajectory_change_and_keeps_config_yaml(tmp_path):
    run(tmp_path, "train.steps=2")
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(jaxllm.ConfigError, match=r"optim.lr: 0.0003 -> 0.001.*train.batch_size: 8 -> 16"):
        run(tmp_path, "train.steps=4", "optim.lr=1e-3", "train.batch_size=16")
    assert (tmp_path / "config.yaml").read_text() == before   # nothing written before the check
    # harmless keys (logging cadence, progress, mesh) pass; the run continues
    s = run(tmp_path, "train.steps=3", "train.log_every=2", "mesh.fsdp=1")
    assert s["resumed_from"] == 2 and s["steps"] == 3
    # an explicit allow accepts the change and says so
    s = run(tmp_path, "train.steps=4", "optim.lr=1e-3", "checkpoint.allow_config_change=true")
    assert s["steps"] == 4


@pytest.mark.slow
def test_extending_steps_keeps_the_lr_of_steps_already_planned(tmp_path, capsys):
    a = run(tmp_path / "a", "train.steps=10", "checkpoint.every=5")
    lr_a = {h["step"]: h["lr"] for h in a["history"]}
    # resume the same run with twice the steps: the schedule keeps its 10-step horizon
    b = run(tmp_path / "a", "train.steps=20")
    assert b["resumed_from"] == 10
    assert "keeps the decay horizon of 10 steps" in capsys.readouterr().err
    lr_b = {h["step"]: h["lr"] for h in b["history"]}
    from jaxllm.training.optim import lr_schedule
    cfg = jaxllm.load_config(None, ARGS + ["train.steps=10"])
    np.testing.assert_allclose(lr_b[11], float(lr_schedule(cfg.optim, 10)(10)), rtol=1e-6)
    assert lr_b[11] <= lr_a[10] * 1.0001   # no jump back up (a 20-step plan would give ~5.9x)


@pytest.mark.slow
def test_init_from_restores_only_params_into_the_target_shardings(tmp_path):
    src = run(tmp_path / "src", "train.steps=3")
    s = run(tmp_path / "dst", "train.steps=1", f"checkpoint.init_from={tmp_path / 'src'}",
            "mesh.devices=0", "mesh.fsdp=8", "optim.lr=0")
    q = s["state"].params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    chex.assert_trees_all_close(jax.device_get(s["state"].params), jax.device_get(src["state"].params),
                                atol=0)   # lr=0: the step changed nothing
    # the optimizer state is fresh, not the source run's moments: one lr=0 step from zero
    # moments gives mu = (1 - b1) * g, never the source's accumulated values
    mu_src = src["state"].opt_state.inner[1][0].mu["lm_head"]["kernel"]
    mu_new = s["state"].opt_state.inner[1][0].mu["lm_head"]["kernel"]
    assert not np.allclose(np.asarray(mu_new), np.asarray(mu_src))


def test_a_second_run_on_the_same_dir_is_refused_and_stale_locks_are_taken_over(tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    lock = tmp_path / ".lock"
    # a live process on this host holds it: our own parent stands in for "another run"
    import socket
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(jaxllm.RunError, match=r"in use by another run \(pid \d+"):
        run(tmp_path, "train.steps=1")
    assert not (tmp_path / "checkpoints").exists()
    # a dead pid: stale, taken over with one line, released at the end
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    s = run(tmp_path, "train.steps=1")
    assert s["steps"] == 1 and "taking over a stale lock" in capsys.readouterr().err
    assert not lock.exists()


def test_concurrent_train_on_one_run_dir_fails_the_second_at_start_up(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny\n")
    first = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "train", str(recipe), *ARGS,
                              "train.steps=400", f"train.run_dir={tmp_path / 'run'}"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time
        t0 = time.time()
        while not (tmp_path / "run" / ".lock").exists():
            assert first.poll() is None and time.time() - t0 < 120
            time.sleep(0.1)
        second = cli("train", str(recipe), *ARGS, "train.steps=400", f"train.run_dir={tmp_path / 'run'}")
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1].startswith("jaxllm: error:")
        assert "in use by another run" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_one_clear_line_or_falls_back(tmp_path, capsys):
    run(tmp_path, "train.steps=4", "checkpoint.every=2")
    # truncate every array file of the newest checkpoint
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "d" in f.parent.name:
            f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=r"cannot restore .*/4: .*newest intact checkpoint is "
                                              r"step 2: set checkpoint.fallback=true"):
        run(tmp_path, "train.steps=6")
    s = run(tmp_path, "train.steps=6", "checkpoint.fallback=true")
    assert s["resumed_from"] == 2 and s["steps"] == 6
    assert "unreadable" in capsys.readouterr().err


def test_bf16_params_train(tmp_path):
    s = run(tmp_path, "train.steps=12", "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16",
            "optim.lr=3e-3")
    assert s["state"].params["lm_head"]["kernel"].dtype == jax.numpy.bfloat16
    assert s["history"][-1]["skipped_updates"] == 0
    assert s["final_loss"] < s["first_loss"] - 0.2


@pytest.mark.slow
def test_eager_debug_mode_reproduces_the_jitted_run(tmp_path):
    common = ["train.steps=3", "train.batch_size=2", "train.seq_len=16"]
    jitted = run(tmp_path / "jit", *common)
    eager = run(tmp_path / "eager", *common, "train.debug=true", "train.disable_jit=true")
    np.testing.assert_allclose([h["loss"] for h in eager["history"]],
                               [h["loss"] for h in jitted["history"]], rtol=1e-5)


def test_eager_layers_run_as_a_python_loop_with_concrete_values():
    cfg = jaxllm.ModelConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=32,
                             remat="full")
    params = jaxllm.init_params(cfg, jax.random.key(0))
    seen = []
    from jaxllm.model import transformer
    real = transformer.Block.__call__

    def spy(self, x, *a, **k):
        seen.append(isinstance(x, jax.core.Tracer))
        return real(self, x, *a, **k)
    transformer.Block.__call__ = spy
    try:
        with jax.disable_jit():
            jaxllm.forward(params, np.zeros((1, 4), np.int32), cfg)
    finally:
        transformer.Block.__call__ = real
    assert seen == [False] * 3   # three layers, each called with concrete arrays (pdb can look)


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny\n")
    argv = ["demo", str(recipe), *ARGS, "train.steps=2", f"train.run_dir={tmp_path / 'run'}"]
    first = cli(*argv)
    assert first.returncode == 0, first.stderr[-2000:]
    # the CLI set glibc up for XLA:CPU before the backend started; the run says so as it starts
    assert first.stderr.count("host allocator: glibc main heap only") == 1, first.stderr[-2000:]
    again = cli(*argv)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished at step 2" in again.stderr
    assert "demo: loss" in again.stdout and "already finished earlier" in again.stdout


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr must be a finite number >= 0"),
    ("optim.lr=nan", "optim.lr must be a finite number >= 0"),
    ("train.mlm_prob=1.5", "train.mlm_prob must be in (0, 1)"),
    ("train.eval_every=-1", "train.eval_every and train.eval_batches must be >= 0"),
    ("mesh.devices=-1", "mesh.devices must be >= 0"),
    ("train.run_dir=", "train.run_dir is empty"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
    ("train.seq_len=1024", "train.seq_len=1024 exceeds model.max_seq_len=512"),
    ("train.sft_normalize=sequence", "train.sft_normalize applies to train.objective=sft, and this run trains clm"),
    ("train.mlm_prob=0.3", "train.mlm_prob applies to train.objective=mlm"),
])
def test_bad_values_are_refused_in_one_line(override, message):
    with pytest.raises(jaxllm.ConfigError) as e:
        jaxllm.load_config(None, ARGS + [override])
    assert message in str(e.value)


def test_mesh_devices_beyond_the_device_count_is_refused(tmp_path):
    with pytest.raises(jaxllm.ConfigError, match="mesh.devices=9 but only 8 devices exist"):
        run(tmp_path, "mesh.devices=9")


def test_checkpoints_are_saved_periodically_by_default():
    assert jaxllm.config.CheckpointConfig().every > 0


def test_train_cli_errors_are_one_line_with_exit_codes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny\ndata:\n  kind: text\n  tokenizer: nowhere/tok\n"
                      "  sources: [{path: 'nowhere/*.jsonl'}]\n")
    out = cli("train", str(recipe), f"train.run_dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxllm: error:"), out.stderr[-2000:]
    shown = cli("--traceback", "train", str(recipe), f"train.run_dir={tmp_path / 'run'}")
    assert "Traceback" in shown.stderr


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    from jaxllm.data.sources import iter_texts
    from jaxllm.data.synthetic import write_corpus
    from jaxllm.data.tokenizer import train_tokenizer
    write_corpus(str(d / "d"), train_docs=200, eval_docs=20, tasks=False)
    train_tokenizer(iter_texts([str(d / "d/pretrain/train-*.jsonl")]), str(d / "tok"), 400)
    return d, ["data.kind=text", f"data.tokenizer={d / 'tok'}", "model.vocab_size=512",
               f"data.sources=[{{path: '{d}/d/pretrain/train-*.jsonl'}}]"]


def test_eval_data_errors_surface_at_start_up(tmp_path, text_data):
    _, data = text_data
    overrides = data + [f"data.eval_sources=[{{path: '{tmp_path}/missing/eval-*.jsonl'}}]",
                        "train.eval_every=1000", "train.steps=2000"]
    with pytest.raises(jaxllm.UserError, match=r"missing/eval-\*.jsonl"):
        run(tmp_path / "run", *overrides)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()   # failed before any step


def test_samples_of_fixed_prompts_are_logged_at_each_evaluation(tmp_path, text_data):
    d, data = text_data
    run(tmp_path, *data, f"data.eval_sources=[{{path: '{d}/d/pretrain/eval-*.jsonl'}}]", "train.steps=4",
        "train.eval_every=2", "train.sample_prompts=[Once upon a time, '7 + 5 =']", "train.sample_tokens=8")
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(2, "Once upon a time"), (2, "7 + 5 ="),
                                                        (4, "Once upon a time"), (4, "7 + 5 =")]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)


def test_eval_sources_left_unread_by_eval_every_0_are_said(tmp_path, text_data, capsys):
    d, data = text_data
    run(tmp_path, *data, "train.steps=1", "train.eval_every=0",
        f"data.eval_sources=[{{path: '{d}/d/pretrain/eval-*.jsonl'}}]")
    assert "note: train.eval_every=0, so data.eval_sources are not read" in capsys.readouterr().err


def test_sample_prompts_that_do_not_fit_are_refused_before_any_step(tmp_path, text_data):
    _, data = text_data
    with pytest.raises(jaxllm.ConfigError, match=r"train.sample_prompts: 'Once upon a time' is \d+ tokens, and "
                                                 r"with train.sample_tokens=510 that exceeds model.max_seq_len=512"):
        run(tmp_path, *data, "train.steps=2", "train.eval_every=1", "train.sample_prompts=[Once upon a time]",
            "train.sample_tokens=510")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_changed_tokenizer_is_refused_on_resume_and_said_on_init_from(tmp_path, text_data, capsys):
    """The tokenizer's contents, not only its path: a file replaced in place changes what every
    token id means. Resuming refuses it (as a config change); a new run from a base trained with
    another tokenizer says so in one line."""
    import shutil

    from jaxllm.data.sources import iter_texts
    from jaxllm.data.tokenizer import train_tokenizer
    d, data = text_data
    tok = tmp_path / "tok"
    shutil.copytree(d / "tok", tok)
    data = [*data[:1], f"data.tokenizer={tok}", *data[2:]]
    run(tmp_path / "a", *data, "train.steps=1")
    capsys.readouterr()
    run(tmp_path / "b", *data, "train.steps=1", f"checkpoint.init_from={tmp_path / 'a'}")   # the same one
    assert "another tokenizer" not in capsys.readouterr().err
    train_tokenizer(iter_texts([str(d / "d/pretrain/eval-*.jsonl")]), str(tmp_path / "other"), 450)
    shutil.copyfile(tmp_path / "other" / "tokenizer.model", tok / "tokenizer.model")   # replaced in place
    with pytest.raises(jaxllm.ConfigError, match=r"data.tokenizer contents: 'sha1 \w+' -> 'sha1 \w+'"):
        run(tmp_path / "a", *data, "train.steps=2")
    # accepted once, the new tokenizer is what the run trains with: later resumes compare with it
    run(tmp_path / "a", *data, "train.steps=2", "checkpoint.allow_config_change=true")
    assert run(tmp_path / "a", *data, "train.steps=3")["resumed_from"] == 2
    capsys.readouterr()
    run(tmp_path / "c", *data, "train.steps=1", f"checkpoint.init_from={tmp_path / 'b'}")   # b: the old one
    assert f"warning: {tmp_path / 'b'} was trained with another tokenizer than data.tokenizer={tok}" \
        in capsys.readouterr().err


def test_a_config_key_added_since_the_checkpoint_is_no_change_at_its_default():
    from jaxllm import configlib
    from jaxllm.config import Config
    from jaxllm.training.run import config_changes
    now = configlib.to_dict(Config())
    saved = configlib.to_dict(Config())
    del saved["rl"]["dpo_rpo_alpha"]                    # a checkpoint from before the key existed
    assert config_changes(saved, now, now) == []
    changed = configlib.to_dict(Config())
    changed["rl"]["dpo_rpo_alpha"] = 1.0
    assert config_changes(saved, changed, now) == [("rl.dpo_rpo_alpha", None, 1.0)]
    assert config_changes(saved, now) == [("rl.dpo_rpo_alpha", None, 0.0)]   # without defaults: said
