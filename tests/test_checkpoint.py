"""Checkpoints: exact resume after kill -9, resharding restore, partial saves, SIGTERM,
non-finite batches, incompatible checkpoints, init_from and convert."""
import json
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.training import loop as loop_lib
from jaxllm.training.checkpoint import CheckpointError
from jaxllm.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["model=tiny", "train.batch_size=16", "train.seq_len=128", "train.log_every=1",
        "train.eval_every=0", "train.progress=false", "optim.warmup_steps=2", "mesh.devices=1"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def launch(run_dir, *overrides):
    recipe = pathlib.Path(run_dir).parent / f"{pathlib.Path(run_dir).name}.yaml"
    recipe.write_text("model: tiny\n")   # the same defaults as load_config(None, ARGS)
    cmd = [sys.executable, "-m", "jaxllm.cli", "train", str(recipe),
           *ARGS, f"train.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"run exited early: {proc.stdout.read().decode()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def saved_steps(run_dir):
    d = pathlib.Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 24-step run."""
    d = tmp_path_factory.mktemp("ref")
    cfg = jaxllm.load_config(None, ARGS + ["train.steps=24", f"train.run_dir={d}"])
    jaxllm.train(cfg)
    return d


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted_bit_for_bit(tmp_path, reference):
    kill_after = random.Random(0).randint(5, 14)
    proc = launch(tmp_path, "train.steps=24", "checkpoint.every=4")
    wait_for(lambda: saved_steps(tmp_path) and max(losses(tmp_path) or {0: 0}) >= kill_after
             if (tmp_path / "metrics.jsonl").exists() else False, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(tmp_path)) < 24, "the run finished before it was killed"
    s = jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=24", "checkpoint.every=4",
                                                      f"train.run_dir={tmp_path}"]))
    assert s["resumed_from"] is not None and s["resumed_from"] % 4 == 0
    assert losses(tmp_path) == losses(reference)   # exact equality: data order, RNG, optimizer


@pytest.mark.slow
def test_resume_onto_a_different_mesh(tmp_path, reference):
    # fsdp=8 on 8 devices for 12 steps, then data=2,tensor=2 on 4 devices for the rest.
    sched = ["optim.decay_steps=24", "checkpoint.every=6"]
    first = ARGS[:-1] + sched + ["train.steps=12", "mesh.fsdp=8", f"train.run_dir={tmp_path}"]
    jaxllm.train(jaxllm.load_config(None, first))
    second = ARGS[:-1] + sched + ["train.steps=24", "mesh.devices=4", "mesh.data=2", "mesh.fsdp=1",
                                  "mesh.tensor=2", "mesh.preset=fsdp_tp", f"train.run_dir={tmp_path}"]
    s = jaxllm.train(jaxllm.load_config(None, second))
    assert s["resumed_from"] == 12
    q = s["state"].params["layers"]["attn"]["q"]["kernel"]
    assert len(q.sharding.device_set) == 4 and "tensor" in q.sharding.spec
    ref, got = losses(reference), losses(tmp_path)
    # the reference used decay_steps = train.steps = 24 too
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[k] for k in sorted(got)], [ref[k] for k in sorted(ref)], rtol=1e-5)


def test_partial_checkpoint_falls_back_to_previous_complete_one(tmp_path, reference):
    args = ARGS + ["checkpoint.every=4", f"train.run_dir={tmp_path}"]
    jaxllm.train(jaxllm.load_config(None, args + ["train.steps=8", "optim.decay_steps=24"]))
    ck = tmp_path / "checkpoints"
    # What a save killed midway leaves: orbax's temporary directory, never renamed to "12".
    import shutil
    shutil.copytree(ck / "8", ck / "12.orbax-checkpoint-tmp-1732850000000000")
    for f in (ck / "12.orbax-checkpoint-tmp-1732850000000000").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:50])
    s = jaxllm.train(jaxllm.load_config(None, args + ["train.steps=24", "optim.decay_steps=24"]))
    assert s["resumed_from"] == 8
    assert losses(tmp_path) == losses(reference)


@pytest.mark.slow
def test_kill9_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path):
    # A 26M-parameter model: params + Adam moments are ~300 MB, so a save takes long enough
    # to be caught in flight (orbax writes into "<step>.orbax-checkpoint-tmp-*" first).
    # 15 steps: enough saves (every 3) to catch one in flight; few enough that the resumed run
    # does not spend minutes writing 300 MB checkpoints
    big = ["model=25m", "train.batch_size=2", "train.seq_len=16", "checkpoint.every=3"]
    proc = launch(tmp_path, "train.steps=15", *big)
    ck = tmp_path / "checkpoints"

    def saving_after_a_complete_one():
        return bool(saved_steps(tmp_path)) and ck.exists() and any(
            "tmp" in p.name for p in ck.iterdir())
    wait_for(saving_after_a_complete_one, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = [p.name for p in ck.iterdir() if "tmp" in p.name]
    complete = saved_steps(tmp_path)
    assert partial and complete, (partial, complete)
    s = jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=15", *big, "train.log_every=5",
                                                      f"train.run_dir={tmp_path}"]))
    assert s["resumed_from"] == max(complete) < 15
    assert s["steps"] == 15 and np.isfinite(s["final_loss"])


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_exits_zero(tmp_path):
    proc = launch(tmp_path, "train.steps=400", "checkpoint.every=1000")
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and max(losses(tmp_path) or {0: 0}) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    last = max(losses(tmp_path))
    assert last < 400 and saved_steps(tmp_path) == [last]
    assert json.loads(out[out.index("{\n \"run_dir\""):])["preempted"] is True


def poisoned(cfg, bad_steps):
    """The configured batches, with token ids beyond the vocabulary at the given (1-based)
    steps: the embedding lookup yields NaN, like corrupt data would."""
    from jaxllm.training.pretrain import data_iterators
    for i, batch in enumerate(data_iterators(cfg)[0], start=1):
        yield dict(batch, tokens=batch["tokens"] + 10_000) if i in bad_steps else batch


def train_poisoned(bad_steps, *overrides):
    cfg = jaxllm.load_config(None, ARGS + list(overrides))
    return jaxllm.train(cfg, batches=poisoned(cfg, bad_steps))


def test_poisoned_batch_is_skipped_and_the_run_continues(tmp_path):
    s = train_poisoned({3}, "train.steps=6", "checkpoint.every=0", f"train.run_dir={tmp_path}")
    rows = {h["step"]: h for h in s["history"]}
    assert not np.isfinite(rows[3]["loss"]) and rows[3]["skipped_updates"] == 1
    assert np.isfinite(rows[6]["loss"]) and s["steps"] == 6
    # the skipped update did not advance the schedule: step 6 uses the lr of update 5
    from jaxllm.training.optim import lr_schedule
    cfg = jaxllm.load_config(None, ARGS + ["train.steps=6"])
    np.testing.assert_allclose(rows[6]["lr"], float(lr_schedule(cfg.optim, 6)(4)), rtol=1e-6)
    np.testing.assert_allclose(rows[2]["lr"], float(lr_schedule(cfg.optim, 6)(1)), rtol=1e-6)
    chex.assert_tree_all_finite(s["state"].params)


def test_params_unchanged_by_a_skipped_update(tmp_path):
    a = jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=2", f"train.run_dir={tmp_path}/a"]))
    b = train_poisoned({3}, "train.steps=3", f"train.run_dir={tmp_path}/b", "optim.decay_steps=2")
    chex.assert_trees_all_equal(jax.device_get(a["state"].params), jax.device_get(b["state"].params))


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    with pytest.raises(loop_lib.NonFiniteError, match="3 consecutive non-finite.*no checkpoint was written"):
        train_poisoned(set(range(3, 100)), "train.steps=20", "optim.max_nonfinite_skips=3",
                       "checkpoint.every=0", f"train.run_dir={tmp_path}")
    with pytest.raises(loop_lib.NonFiniteError, match=r"the last checkpoint \(step 4\) holds finite"):
        train_poisoned(set(range(3, 100)), "train.steps=20", "optim.max_nonfinite_skips=3",
                       "checkpoint.every=2", "checkpoint.async_save=false", f"train.run_dir={tmp_path}/b")


def test_incompatible_checkpoint_names_what_differs(tmp_path):
    args = ARGS + ["train.steps=2", f"train.run_dir={tmp_path}"]
    jaxllm.train(jaxllm.load_config(None, args))
    with pytest.raises(jaxllm.ConfigError, match=r"trained with another config: model.n_layers: 2 -> 3"):
        jaxllm.train(jaxllm.load_config(None, args + ["train.steps=4", "model.n_layers=3"]))
    with pytest.raises(CheckpointError, match=r"does not match this run.*checkpoint shape \(2,"):
        jaxllm.train(jaxllm.load_config(None, args + ["train.steps=4", "model.n_layers=3",
                                                      "checkpoint.allow_config_change=true"]))


def test_init_from_and_convert_round_trip(tmp_path, reference):
    from jaxllm.interop.cli import convert
    convert(str(reference), str(tmp_path / "hf"), "hf")
    cfg, hf_params = jaxllm.load_hf(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "orbax"), "orbax")
    s = jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=1", "optim.lr=0",
                                                      f"checkpoint.init_from={tmp_path / 'orbax'}",
                                                      f"train.run_dir={tmp_path}/new"]))
    assert s["resumed_from"] is None
    chex.assert_trees_all_close(jax.device_get(s["state"].params), hf_params, atol=0)
    assert s["first_loss"] < losses(reference)[1] - 0.1   # starts from trained weights (same batch 1)


def test_missing_init_from_is_a_clear_error(tmp_path):
    with pytest.raises(jaxllm.UserError, match="not a run dir, orbax checkpoint dir or HF model dir"):
        jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=1", f"train.run_dir={tmp_path}",
                                                      f"checkpoint.init_from={tmp_path}/nowhere"]))


def test_resume_false_in_a_used_run_dir_is_refused(tmp_path):
    args = ARGS + ["train.steps=2", f"train.run_dir={tmp_path}"]
    jaxllm.train(jaxllm.load_config(None, args))
    with pytest.raises(jaxllm.ConfigError, match="already holds checkpoints and checkpoint.resume=false"):
        jaxllm.train(jaxllm.load_config(None, args + ["checkpoint.resume=false"]))


def test_init_from_another_model_names_the_differences(tmp_path):
    jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=1", f"train.run_dir={tmp_path}/a"]))
    with pytest.raises(jaxllm.ConfigError, match=r"has another model: rope_theta: 10000.0 there vs 500000.0 here"):
        jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=1", "model.rope_theta=5e5",
                                                      f"checkpoint.init_from={tmp_path}/a",
                                                      f"train.run_dir={tmp_path}/b"]))


def test_convert_refuses_a_non_empty_destination_unless_overwrite(tmp_path, reference):
    from jaxllm.interop.cli import convert
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "mine.txt").write_text("a user's file")
    with pytest.raises(jaxllm.UserError, match="is not empty.*--overwrite"):
        convert(str(reference), str(dst), "hf")
    assert not (dst / "config.json").exists()
    convert(str(reference), str(dst), "hf", overwrite=True)
    assert (dst / "config.json").exists() and (dst / "mine.txt").read_text() == "a user's file"
    convert(str(dst), str(tmp_path / "orbax"), "orbax")
    with pytest.raises(jaxllm.UserError, match="is not empty"):
        convert(str(dst), str(tmp_path / "orbax"), "orbax")   # would leave the old model in place
    convert(str(dst), str(tmp_path / "orbax"), "orbax", overwrite=True)   # its own export: replaced
    # --overwrite into a run's checkpoints/ (its step 0 is not a convert export): refused, kept
    run = tmp_path / "run"
    jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=1", "checkpoint.every=1", f"train.run_dir={run}"]))
    with pytest.raises(jaxllm.UserError, match=r"holds checkpoint steps \['1'\].*directory of its own"):
        convert(str(dst), str(run / "checkpoints"), "orbax", overwrite=True)   # no step 0 there: still refused
    (run / "checkpoints" / "1").rename(run / "checkpoints" / "0")   # where the export would go
    with pytest.raises(jaxllm.UserError, match="was not written by `jaxllm convert --to orbax`.*will not delete"):
        convert(str(dst), str(run / "checkpoints"), "orbax", overwrite=True)
    assert (run / "checkpoints" / "0").is_dir()


@pytest.mark.slow
def test_convert_and_init_from_read_checkpoints_of_another_device_count(tmp_path):
    # written by an 8-device fsdp run, read on one device (convert) and into fsdp=2 (init_from)
    src = jaxllm.train(jaxllm.load_config(None, [a for a in ARGS if a != "mesh.devices=1"] + [
        "mesh.fsdp=8", "train.batch_size=8", "train.steps=2", f"train.run_dir={tmp_path}/src"]))
    from jaxllm.interop.cli import convert
    convert(str(tmp_path / "src"), str(tmp_path / "hf"), "hf")
    _, hf_params = jaxllm.load_hf(tmp_path / "hf")
    chex.assert_trees_all_close(hf_params, jax.device_get(src["state"].params), atol=0)
    s = jaxllm.train(jaxllm.load_config(None, ARGS + [
        "mesh.devices=2", "mesh.fsdp=2", "train.steps=1", "optim.lr=0",
        f"checkpoint.init_from={tmp_path}/src", f"train.run_dir={tmp_path}/dst"]))
    chex.assert_trees_all_close(jax.device_get(s["state"].params), jax.device_get(src["state"].params),
                                atol=0)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A 2-step run on text data, with the SentencePiece tokenizer its config.yaml names."""
    from jaxllm.data import synthetic
    d = tmp_path_factory.mktemp("textrun")
    data = synthetic.prepare_default_data(str(d / "synth"), train_docs=200, eval_docs=4, vocab_size=400, tasks=False)
    jaxllm.train(jaxllm.load_config(None, ARGS + [
        "data.kind=text", f"data.tokenizer={data['tokenizer']}", f"data.sources=[{{path: '{data['train']}'}}]",
        "train.steps=2", "train.batch_size=4", "train.seq_len=64", f"train.run_dir={d / 'run'}"]))
    return d / "run", pathlib.Path(data["tokenizer"])


def test_convert_to_hf_carries_the_runs_tokenizer_ids_and_files(tmp_path, text_run):
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.evaluation.source import load_model
    from jaxllm.interop.cli import convert
    from jaxllm.model.generate import generate_text
    run, tok_dir = text_run
    tok = load_tokenizer(tok_dir)
    for src in (run, run / "checkpoints"):   # the checkpoints/ dir finds the run's config.yaml above it
        out = tmp_path / src.name
        assert convert(str(src), str(out), "hf").endswith(f"with the tokenizer {tok_dir}")
        hf = json.loads((out / "config.json").read_text())
        assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert (out / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
        tc = json.loads((out / "tokenizer_config.json").read_text())
        assert (tc["bos_token"], tc["eos_token"]) == (tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id))
        assert "chat_template" not in tc   # a text run trained with no template
    jaxllm.load_hf(out)
    texts = []
    for m in (load_model(run), load_model(out)):   # the export needs no --tokenizer
        texts.append(generate_text(m.params, m.cfg, m.tokenizer, ["Once upon", "hi"], max_new_tokens=6,
                                   key=jax.random.key(0)))
    assert texts[0] == texts[1]
    try:
        from transformers import LlamaConfig
    except ImportError:
        return
    c = LlamaConfig.from_pretrained(out)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_convert_to_hf_without_a_tokenizer_says_so_and_leaves_no_stale_one(tmp_path, reference, text_run):
    from jaxllm.interop.cli import convert
    dst = tmp_path / "hf"
    convert(str(text_run[0]), str(dst), "hf")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    # synthetic tokens: no tokenizer to replace the one in dst, which jaxllm will not delete
    with pytest.raises(jaxllm.UserError, match="holds tokenizer.model, tokenizer_config.json, and .* names no "
                                               "tokenizer to replace them: pass --tokenizer, or remove them"):
        convert(str(reference), str(dst), "hf", overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before   # nothing written or deleted
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (dst / name).unlink()
    (dst / "model_fp16_backup.safetensors").write_text("the user's")    # not a name an export writes
    msg = convert(str(reference), str(dst), "hf", overwrite=True)
    assert (dst / "model_fp16_backup.safetensors").read_text() == "the user's"
    assert msg == (f"wrote HF checkpoint to {dst}; no tokenizer written (the source names none): pass "
                   f"--tokenizer to generate, and set bos/eos ids for transformers")
    assert not any((dst / n).exists() for n in ("tokenizer.model", "tokenizer_config.json"))
    assert "eos_token_id" not in json.loads((dst / "config.json").read_text())
    # --tokenizer supplies one; a named tokenizer that does not exist is a one-line error, before writing
    assert convert(str(reference), str(dst), "hf", overwrite=True, tokenizer=str(text_run[1])).endswith(
        f"with the tokenizer {text_run[1]}")
    assert (dst / "tokenizer.model").exists()
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        convert(str(reference), str(tmp_path / "x"), "hf", tokenizer=str(tmp_path / "nope"))
    assert not (tmp_path / "x").exists()
    for to in ("orbax", "peft"):   # they write no tokenizer: --tokenizer would be ignored, so it is refused
        with pytest.raises(jaxllm.UserError, match=f"--tokenizer goes with --to hf.*--to {to} writes none"):
            convert(str(reference), str(tmp_path / "y"), to, tokenizer=str(text_run[1]))
    assert not (tmp_path / "y").exists()


def test_an_exported_sentencepiece_tokenizer_keeps_its_own_chat_template(tmp_path, text_run):
    """A tokenizer.model whose dir carries a template (an HF Llama-2-style dir, a jaxllm export)
    is exported with it: a run that trained with the tokenizer's own template exports that one."""
    import shutil

    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.interop.hf import save_tokenizer
    src = tmp_path / "tok"
    src.mkdir()
    shutil.copyfile(text_run[1] / "tokenizer.model", src / "tokenizer.model")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    save_tokenizer(tmp_path / "out", src)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == template
    assert load_tokenizer(tmp_path / "out").chat_template == template


def test_convert_exports_the_chat_template_a_chat_run_trained_with(tmp_path, text_run):
    from jaxllm.data.chat import chat_prompt, render_chat
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.interop.cli import _trained_chat_template
    from jaxllm.interop.hf import CHATML_JINJA, save_tokenizer
    tok = load_tokenizer(text_run[1])
    run = tmp_path / "run"
    run.mkdir()
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    cases = {"": CHATML_JINJA, "chatml": CHATML_JINJA, str(jinja): jinja.read_text()}
    for spec, want in cases.items():
        (run / "config.yaml").write_text(f"data: {{kind: chat, tokenizer: x, chat_template: '{spec}'}}\n")
        assert _trained_chat_template(str(run), tok) == want
    (run / "config.yaml").write_text("data: {kind: text}\n")
    assert _trained_chat_template(str(run), tok) is None
    save_tokenizer(tmp_path / "out", text_run[1], CHATML_JINJA)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == CHATML_JINJA
    # the Jinja ChatML renders what the built-in ChatML renders
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chat(msgs, tok, CHATML_JINJA) == render_chat(msgs, tok, "chatml")
    assert chat_prompt(msgs[:1], tok, CHATML_JINJA) == chat_prompt(msgs[:1], tok, "chatml")
    # jaxllm reads an exported SentencePiece tokenizer's template back (chat, generate on OUT),
    # also in a grain worker's pickled copy; the run's own tokenizer dir has none
    save_tokenizer(tmp_path / "out2", text_run[1], jinja.read_text())
    back = load_tokenizer(tmp_path / "out2")
    assert back.chat_template == jinja.read_text() and tok.chat_template is None
    assert pickle.loads(pickle.dumps(back)).chat_template == jinja.read_text()
    assert chat_prompt(msgs[:1], back) == chat_prompt(msgs[:1], tok, jinja.read_text())
