"""`jaxllm demo --quick` end to end, as a user runs it: killed during pretraining, then run again.

One demo is run for the module (about three minutes on 2 CPU cores): the first run gets
SIGTERM once pretraining has written a checkpoint; the second run finishes the demo. Every
path is under a temporary directory (the current directory too), so nothing lands in the
repository's runs/ or data/.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

STAGES = ("synth", "crawl", "curate", "tokenizer", "pretrain", "sft", "merge", "label", "reward", "ppo", "compare",
          "report")
BEFORE_PRETRAIN = ("raw/truth.jsonl", "curated/report.json", "tokenizer/tokenizer.model", "synth/ppo/eval.jsonl")


def _env():
    # the demo trains on this machine's one CPU device, not the 8 the unit tests simulate
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, PYTHONUNBUFFERED="1")


def _demo(out, cwd, log):
    cmd = [sys.executable, "-m", "jaxllm.cli", "demo", "--quick", "--out", str(out)]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=open(log + ".out", "w"), stderr=open(log + ".err", "w"))


def _checkpointed(run_dir) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out, cwd = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("cwd")
    log = str(tmp_path_factory.mktemp("logs"))
    p = _demo(out, cwd, f"{log}/first")
    deadline = time.time() + 300
    while not _checkpointed(out / "runs/pretrain") and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert p.poll() is None, open(f"{log}/first.err").read()[-3000:]
    p.send_signal(signal.SIGTERM)
    first_rc = p.wait(timeout=120)
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in BEFORE_PRETRAIN}
    t0 = time.time()
    second_rc = _demo(out, cwd, f"{log}/second").wait(timeout=600)
    read = lambda name: open(f"{log}/{name}").read()   # noqa: E731
    return {"out": out, "cwd": cwd, "mtimes": mtimes, "seconds": time.time() - t0,
            "first": (first_rc, read("first.out"), read("first.err")),
            "second": (second_rc, read("second.out"), read("second.err"))}


def test_quick_demo_makes_every_stage_and_a_report(demo):
    out = demo["out"]
    rc, stdout, stderr = demo["second"]
    assert rc == 0, stderr[-3000:]
    for stage in STAGES:
        assert re.search(rf"\] {stage}: (done in|skipped, )", stderr), stage
    for path in ("synth/ppo/eval.jsonl", "raw/truth.jsonl", "curated/report.json", "tokenizer/tokenizer.model",
                 "runs/sft-lora/adapter/adapter_config.json", "runs/sft/config.json", "labels/train.jsonl",
                 "labels/eval.jsonl", "compare/answers.json",
                 "report.md"):
        assert (out / path).exists(), path
    for run in ("pretrain", "sft-lora", "reward", "ppo"):
        assert _checkpointed(out / "runs" / run), run
    report = (out / "report.md").read_text()
    for stage in STAGES:
        assert f"| {stage} |" in report, stage
    for png in re.findall(r"\]\((report-[a-z]+\.png)\)", report):
        assert (out / png).stat().st_size > 0, png
    assert {"report-curation.png", "report-pretrain.png", "report-sft.png", "report-ppo.png",
            "report-compare.png"} <= {p.name for p in out.glob("report-*.png")}
    assert "demo: report at" in stdout and len(stdout.strip().splitlines()) == 4
    # nothing was written outside the demo directory
    assert not any(demo["cwd"].iterdir())


def test_ppo_rollouts_end_its_critic_learns_and_it_beats_sft_on_held_out_prompts(demo):
    rows = [json.loads(line) for line in (demo["out"] / "runs/ppo/metrics.jsonl").open()]
    it = [r for r in rows if "score" in r]
    scores = [r["score"] for r in it]
    assert len(scores) == 30 and all(map(math.isfinite, scores))
    # The SFT stage trains the chat specials' rows, so the policy's sampled answers end (LoRA
    # alone: 72-91% of the first iterations' rollouts ended, measured 2026-12-05).
    assert min(r["ended_fraction"] for r in it[:5]) >= 0.95, [r["ended_fraction"] for r in it[:5]]
    # The critic learns the returns' level: its value loss falls (2026-12-05: ~0.65 -> ~0.12;
    # at the policy's learning rate it stayed put). Not its explained variance: with rollouts at
    # temperature 0.7 scored by a reward model of the policy's own answers, the returns vary
    # little between responses and it measured -0.2..-3 while the loss fell.
    vf = [r["vf_loss"] for r in it]
    assert sum(vf[-5:]) / 5 < 0.5 * sum(vf[:2]) / 2, vf
    # PPO moves the policy, within bounds (mean KL of the last 10 iterations: 0.26-0.41 measured;
    # one iteration's k1 estimate can be negative)
    kl = sum(r["kl"] for r in it[-10:]) / 10
    assert 0.1 < kl < 2.0, [r["kl"] for r in it]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    res = json.loads((demo["out"] / "compare/answers.json").read_text())
    greedy, sampled = res["mean_true_reward"], res["sampled"]["mean_true_reward"]
    assert len(res["prompts"]) == 64 and res["sampled"]["samples"] == 8
    print(f"PPO score {first:.3f} -> {last:.3f}; mean true reward, greedy: {greedy}; sampled: {sampled}; "
          f"by task (sampled): {res['sampled']['by_task']}")
    # The true (programmatic) reward: SFT well above the pretrained model, and PPO above SFT on
    # answers sampled as PPO samples them (the distribution it optimises; quick demo, 4 runs of
    # 2026-12-05: +0.12..+0.19). Greedy answers are printed, not asserted: one argmax flip in a
    # count moves them, and PPO vs SFT greedy measured -0.04..+0.09 over those runs.
    assert greedy["SFT"] > greedy["pretrained"] + 0.3, greedy
    assert sampled["PPO"] > sampled["SFT"], sampled


def test_killed_demo_resumes_pretraining_without_redoing_earlier_stages(demo):
    rc, _, stderr = demo["first"]
    assert rc == 1 and "pretrain stopped at step" in stderr, stderr[-3000:]
    _, _, stderr = demo["second"]
    for stage in ("synth", "crawl", "curate", "tokenizer"):
        assert re.search(rf"\] {stage}: skipped, ", stderr), stage
    assert re.search(r"\] pretrain: .*has a checkpoint at step \d+: resuming it", stderr)
    assert re.search(r"resumed \S*runs/pretrain at step \d+", stderr)
    for f, t in demo["mtimes"].items():
        assert os.stat(demo["out"] / f).st_mtime_ns == t, f"{f} was rewritten"
    steps = [json.loads(line)["step"] for line in (demo["out"] / "runs/pretrain/metrics.jsonl").open()
             if '"loss"' in line]
    assert steps == sorted(steps) and steps[-1] == 500   # one run's metrics, as if never killed


def test_grpo_and_dpo_on_the_demo_models_also_beat_sft(demo, tmp_path):
    """Issue 12's other two objectives on the quick demo's models: GRPO (the PPO loop with G
    answers per prompt and no critic) against the demo's reward model, and DPO (LoRA over the
    SFT model) on the demo's rankings (written variants + the label stage's). Each raises the
    true reward of sampled answers over SFT (2026-12-05, 100 held-out prompts: SFT -0.163,
    GRPO -0.042, DPO +0.025 (200 steps); DPO at 100 steps on 64 prompts +0.040 vs -0.132)."""
    import contextlib

    import jaxllm
    from jaxllm.configlib import REPO_CONFIGS
    from jaxllm.demo.evaluate import compare
    with contextlib.chdir(demo["out"]):
        jaxllm.train(jaxllm.load_config(REPO_CONFIGS / "demo/ppo.yaml", [
            "mesh.devices=1", f"train.run_dir={tmp_path / 'grpo'}", "train.steps=30", "train.eval_every=0",
            "checkpoint.every=30",
            "train.objective=grpo", "rl.group_size=4", "train.batch_size=8", "rl.value_init=zero"]))
        jaxllm.train(jaxllm.load_config(REPO_CONFIGS / "dpo/tiny.yaml", [
            "mesh.devices=1", f"train.run_dir={tmp_path / 'dpo'}", "train.steps=100", "train.eval_every=0",
            "checkpoint.init_from=runs/sft", "data.tokenizer=tokenizer",
            "data.sources=[{path: synth/reward/train.jsonl}, {path: labels/train.jsonl}]",
            "data.eval_sources=[{path: labels/eval.jsonl}]"]))
        res = compare({"SFT": "runs/sft", "GRPO": str(tmp_path / "grpo"), "DPO": str(tmp_path / "dpo")}, "tokenizer",
                      "synth/ppo/eval.jsonl", 64, 40, temperature=0.7, top_k=3, samples=8)
    sampled = res["sampled"]["mean_true_reward"]
    print(f"mean true reward, greedy: {res['mean_true_reward']}; sampled: {sampled}")
    assert sampled["GRPO"] > sampled["SFT"] and sampled["DPO"] > sampled["SFT"], sampled


# LoRA r=8 as the demo recipe runs it, but training every row of the embedding tables beside the
# delta (lora.trainable_tokens=[all], PEFT's trainable_token_indices over the vocabulary) in place
# of the chat specials' rows only, as the adapters do (adapter.train_embeddings): full SFT trains
# them, and on these small bases they are most of what a delta over the layers lacks (README).
LORA_EVERY_ROW = ["lora.r=8", "lora.alpha=16", "lora.trainable_tokens=[all]"]


def _three_ways(out, tmp_path, base: str, model: list, n_convs: int, ways) -> dict:
    """Train each of `ways` ((name, demo recipe, overrides), 250 steps) from `base` in the demo dir
    `out`; held-out chat exact match of the base and of each, on the first `n_convs` eval-split
    conversations: {name: {"all" | "seen" | "unseen": fraction}} ("seen": the conversation also
    occurs verbatim in the train split, which a small task space allows)."""
    import contextlib

    import jax

    import jaxllm
    from jaxllm.configlib import REPO_CONFIGS
    from jaxllm.data.synthetic_tasks import chat_examples
    from jaxllm.evaluation.exact_match import chat_exact_match
    from jaxllm.evaluation.source import load_model
    key = json.dumps
    with contextlib.chdir(out):
        seen = {key(json.loads(line)["messages"]) for line in open("synth/chat/train.jsonl")}
        convs = [c["messages"] for c in chat_examples(n_convs, seed=0, split="eval")]
        assert [json.loads(line)["messages"] for line in open("synth/chat/eval.jsonl")] == convs[:100]
        runs = {"pretrained": base}
        for name, recipe, extra in ways:
            runs[name] = str(tmp_path / recipe)
            jaxllm.train(jaxllm.load_config(REPO_CONFIGS / f"demo/{recipe}.yaml", [
                "mesh.devices=1", f"train.run_dir={runs[name]}", "train.steps=250", "train.eval_every=0",
                "checkpoint.every=250", f"checkpoint.init_from={base}", *model, *extra]))
        res = {}
        for name, src in runs.items():
            m = load_model(src, "tokenizer")
            res[name] = {part: chat_exact_match(m.params, m.cfg, m.tokenizer, cs)["exact_match"] for part, cs in (
                ("all", convs), ("seen", [c for c in convs if key(c) in seen]),
                ("unseen", [c for c in convs if key(c) not in seen]))}
            jax.clear_caches()   # each program holds memory maps; a pytest worker lives long
    print(f"held-out chat exact match ({n_convs} eval conversations; seen/unseen: occurs verbatim in the "
          "train split or not)")
    for name, r in res.items():
        print(f"  {name:10s} all {r['all']:.3f}  seen {r['seen']:.3f}  unseen {r['unseen']:.3f}")
    return res


def test_full_sft_lora_and_adapters_on_the_demo_base(demo, tmp_path):
    """Issue 10's learning comparison on the quick demo's pretrained model, each way 250 steps
    over the same chat data: full SFT (demo/sft.yaml), LoRA r=8 (demo/lora.yaml at r=8, every
    row of the embedding tables trained beside it: LORA_EVERY_ROW) and bottleneck adapters
    (demo/adapter.yaml, which trains the tables too), held-out chat exact match on 300
    conversations of the eval split. The task space is small, so some eval conversations also
    occur verbatim in the train split: the figures are printed for those ("seen") and the rest
    ("unseen") too. 2026-12-07, AVX2 machine, Python 3.13 / jax 0.12.1, data.seed 0 and 1: full
    0.377 / 0.350, LoRA r=8 with every row 0.393 / 0.407, with the specials' rows only 0.297 /
    0.290, adapters 0.377 / 0.377. Earlier (specials' rows only for both deltas; 2026-12-06):
    LoRA 4-9 points under full SFT, adapters 15-22. Asserted: both within 6 points."""
    res = _three_ways(demo["out"], tmp_path, "runs/pretrain", [], 300, (
        ("full SFT", "sft", []), ("LoRA r=8", "lora", LORA_EVERY_ROW), ("adapters", "adapter", [])))
    full, lora_, adapters, pre = (res[k]["all"] for k in ("full SFT", "LoRA r=8", "adapters", "pretrained"))
    print(f"gap to full SFT: LoRA {full - lora_:+.3f}, adapters {full - adapters:+.3f}")
    assert pre < 0.05 and full > pre + 0.25, res
    # 2026-12-07 (AVX2, Python 3.13), two data seeds: LoRA -1.7 / -5.7 points, adapters 0.0 / -2.7
    assert full - lora_ < 0.06 and full - adapters < 0.06, res


def _small_base_comparison(out, tmp_path) -> dict:
    """configs/model/small.yaml pretrained 1,500 steps on the demo's corpus in `out`, then
    _three_ways on 600 conversations (adapters at size 64)."""
    import contextlib

    import jaxllm
    from jaxllm.configlib import REPO_CONFIGS
    model = ["model=small", "model.compute_dtype=bfloat16"]
    base = str(tmp_path / "pretrain")
    with contextlib.chdir(out):
        jaxllm.train(jaxllm.load_config(REPO_CONFIGS / "demo/pretrain.yaml", [
            "mesh.devices=1", f"train.run_dir={base}", "train.steps=1500", "train.eval_every=1500",
            "train.log_every=100", "checkpoint.every=1500", *model]))
    return _three_ways(out, tmp_path, base, model, 600, (
        ("full SFT", "sft", []), ("LoRA r=8", "lora", LORA_EVERY_ROW), ("adapters", "adapter", ["adapter.size=64"])))


def test_lora_and_adapters_within_a_few_points_of_full_sft_on_a_small_base(demo, tmp_path):
    """Issue 10's "LoRA and adapters within a few points of full SFT", on a base with room for a
    delta: configs/model/small.yaml (d=128, 4 layers, ~0.9M parameters; tiny is d=64, 2 layers)
    pretrained 1,500 steps on the quick demo's corpus (demo/pretrain.yaml), then each way 250 steps
    as above, bf16 compute; adapters at size 64 (half of d, as size 32 is of tiny's d=64).
    Exact match on 600 eval conversations (one run's standard error ~2 points).
    2026-12-07, AVX2 machine, Python 3.13 / jax 0.12.1 (full SFT 0.443 / 0.443 / 0.445 / 0.440 in
    the four runs: data.seed 0, train.seed 1, data.seed 1, data.seed 2): adapters with every
    table row (adapter.train_embeddings, the recipe) 0.390 / 0.378 / 0.397 / 0.397, gaps 4.3-6.5
    points; LoRA r=8 with every row (LORA_EVERY_ROW) 0.427 (data.seed 0) and 0.440 (data.seed 1),
    gaps 1.6 and 0.5; LoRA r=8 with the specials' rows only 0.382 / 0.408 / 0.422 (train.seed 1,
    data.seed 1, 2), gaps 1.8-6.2. Before the tables were trained (2026-12-06): LoRA 5.0, adapters
    11.0. Asserted: LoRA under 6 points, adapters under 10 (a difference's standard error here is
    ~2.5-3 points)."""
    # In its own process: in the pytest worker that had run this module's other tests, the
    # evaluation's many generate() compilations failed ("Failed to materialize symbols", CI
    # 2026-12-06) and took the worker's later test files down with it. Likely cause, not proven:
    # the process's memory-map limit (65,530 here); every compiled program keeps its maps (~3 for
    # a small one, measured) until jax.clear_caches().
    code = (f"import json, pathlib, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import test_demo; res = test_demo._small_base_comparison(pathlib.Path({str(demo['out'])!r}), "
            f"pathlib.Path({str(tmp_path)!r})); print('RESULT ' + json.dumps(res))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    print("\n".join(line for line in p.stdout.splitlines() if line.startswith(("held-out", "  "))))
    res = json.loads([line for line in p.stdout.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
    full, lora_, adapters, pre = (res[k]["all"] for k in ("full SFT", "LoRA r=8", "adapters", "pretrained"))
    print(f"gap to full SFT: LoRA {full - lora_:+.3f}, adapters {full - adapters:+.3f}")
    assert pre < 0.05 and full > pre + 0.3, res
    # 2026-12-07 (AVX2, Python 3.13): LoRA 1.6 / 0.5 points in two data seeds, adapters 4.3-6.5 in four runs
    assert full - lora_ < 0.06 and full - adapters < 0.10, res
