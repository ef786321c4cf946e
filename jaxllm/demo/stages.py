"""The demo's stages, in order. Each reads the previous stages' files, writes its own under the
demo directory (its current directory while it runs), and is the command it prints: a
`jaxllm` verb over a recipe in configs/demo/, or `jaxllm demo --stage NAME` for the demo's
own steps (the crawl generator, the comparison, the report).

    synth      jaxllm data synth           synth/ (pretraining, chat, rankings, PPO prompts)
    crawl      the raw crawl-like corpus   raw/crawl-*.jsonl + raw/truth.jsonl
    curate     jaxllm curate               curated/part-*.jsonl + report.json
    tokenizer  jaxllm tokenizer train      tokenizer/ (curated + synthetic pretraining text)
    pretrain   jaxllm train                runs/pretrain
    sft        jaxllm train                runs/sft-lora (LoRA) or runs/sft (--full-sft)
    merge      jaxllm convert --to hf      runs/sft: the LoRA delta folded into its base (LoRA only)
    label      jaxllm data rank            labels/: the SFT model's own answers, ranked (train, eval)
    reward     jaxllm train                runs/reward (the written variants + labels/)
    ppo        jaxllm train                runs/ppo
    compare    held-out prompts answered   compare/answers.json
    report     report.md + PNGs
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import pathlib
import shlex
import shutil
import sys
from typing import Callable

from jaxllm.demo.config import DEMO_CONFIGS, DemoConfig


class Interrupted(Exception):
    """A training stage stopped early on SIGTERM/SIGINT after saving its checkpoint."""


@dataclasses.dataclass(frozen=True)
class Context:
    out: str                 # the demo directory (absolute)
    cfg: DemoConfig
    cfg_path: str
    quick: bool
    full_sft: bool
    no_reward_model: str | None   # why no reward model can be trained here (PPO then scores
                                  # with the programmatic reward), or None

    def cli(self, *args: str) -> str:
        return " ".join(shlex.quote(a) for a in ("jaxllm", *args))

    def demo_cli(self, stage: str) -> str:
        flags = ["--quick"] * self.quick + ["--full-sft"] * self.full_sft
        return self.cli("demo", "--out", self.out, *flags, "--stage", stage, "--force")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    command: Callable[[Context], str]
    outputs: Callable[[Context], list[str]]         # removed before a redo
    done: Callable[[Context], str | None]           # why the output is complete, or None
    run: Callable[[Context], str]                   # -> one line on what it made
    started: Callable[[Context], str | None] = lambda ctx: None   # a resumable partial output
    cannot: Callable[[Context], str | None] = lambda ctx: None   # why it cannot run here


# ---------------------------------------------------------------------------- synthetic corpus
def _synth_args(ctx: Context) -> list[str]:
    c = ctx.cfg
    return ["--out", "synth", "--train-docs", str(c.synth_train_docs), "--eval-docs", str(c.synth_eval_docs),
            "--shards", str(c.synth_shards), "--seed", str(c.seed)]


def _synth_done(ctx: Context) -> str | None:
    # write_corpus writes ppo/eval.jsonl last, with eval_docs // 4 records
    want = max(ctx.cfg.synth_eval_docs // 4, 1)
    path = pathlib.Path("synth/ppo/eval.jsonl")
    if path.exists() and sum(1 for _ in path.open(encoding="utf-8")) == want:
        return f"synth/ holds the corpus (ppo/eval.jsonl complete with {want} prompts)"
    return None


def _synth_run(ctx: Context) -> str:
    from jaxllm.data.synthetic import write_corpus
    c = ctx.cfg
    counts = write_corpus("synth", train_docs=c.synth_train_docs, eval_docs=c.synth_eval_docs,
                          seed=c.seed, shards=c.synth_shards)
    return ", ".join(f"{rel} {n}" for rel, n in counts.items())


# ---------------------------------------------------------------------------- crawl + curation
def _crawl_run(ctx: Context) -> str:
    from jaxllm.demo.crawl import write_crawl
    counts = write_crawl("raw", ctx.cfg.crawl_docs, ctx.cfg.crawl_shards, ctx.cfg.seed)
    return f"{sum(counts.values())} raw documents: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def _curate_args(ctx: Context) -> list[str]:
    return [str(DEMO_CONFIGS / "curate.yaml"), "input.paths=[raw/crawl-*.jsonl]", "output.dir=curated",
            *ctx.cfg.overrides.curate]


def _curate_done(ctx: Context) -> str | None:
    try:
        rep = json.loads(pathlib.Path("curated/report.json").read_text())
    except (OSError, ValueError):
        return None
    parts = glob.glob("curated/part-*")
    if len(parts) != rep["output"]["shards"]:
        return None
    return f"curated/ holds {rep['output']['docs']} documents in {len(parts)} shards and report.json"


def _curate_run(ctx: Context) -> str:
    from jaxllm.curate import config
    from jaxllm.curate.cli import format_report, run
    args = _curate_args(ctx)
    with contextlib.redirect_stdout(sys.stderr):   # the demo's stdout is its summary alone
        rep = run(config.load(args[0], args[1:]))
        print(format_report(rep), flush=True)
    return f"{rep['input']['records']} raw -> {rep['output']['docs']} curated documents"


# ---------------------------------------------------------------------------- tokenizer
TOKENIZER_INPUTS = ("curated/part-*.jsonl", "synth/pretrain/train-*.jsonl")


def _tokenizer_run(ctx: Context) -> str:
    from jaxllm.data.sources import iter_texts
    from jaxllm.data.tokenizer import train_tokenizer
    tok = train_tokenizer(iter_texts(list(TOKENIZER_INPUTS)), "tokenizer", ctx.cfg.vocab_size, seed=ctx.cfg.seed)
    return f"tokenizer/tokenizer.model: {tok.vocab_size} pieces"


def _tokenizer_done(ctx: Context) -> str | None:
    # tokenizer.vocab is written after tokenizer.model
    return "tokenizer/ holds tokenizer.model and .vocab" if os.path.exists("tokenizer/tokenizer.vocab") else None


# ---------------------------------------------------------------------------- training stages
def recipe(ctx: Context, stage: str) -> tuple[str, list[str]]:
    """(recipe file, overrides) of a training stage, as its command states them."""
    o = ctx.cfg.overrides
    if stage == "sft":
        return str(DEMO_CONFIGS / ("sft.yaml" if ctx.full_sft else "lora.yaml")), list(o.sft)
    extra = ["rl.reward_model="] if stage == "ppo" and ctx.no_reward_model else []
    return str(DEMO_CONFIGS / f"{stage}.yaml"), [*getattr(o, stage), *extra]


def _train_cfg(ctx: Context, stage: str):
    from jaxllm.config import load_config
    path, overrides = recipe(ctx, stage)
    return load_config(path, overrides)


def _latest_step(run_dir: str) -> int | None:
    from jaxllm.config import CheckpointConfig
    from jaxllm.training.checkpoint import Checkpointer
    ckpts = pathlib.Path(run_dir) / "checkpoints"
    if not ckpts.is_dir() or not any(ckpts.iterdir()):
        return None
    ck = Checkpointer(ckpts, CheckpointConfig(), read_only=True)
    try:
        return ck.latest_step()
    finally:
        ck.close()


def train_stage(name: str, what: str, cannot=lambda ctx: None) -> Stage:
    def command(ctx):
        path, overrides = recipe(ctx, name)
        return ctx.cli("train", path, *overrides)

    def outputs(ctx):
        return [_train_cfg(ctx, name).train.run_dir]

    def done(ctx):
        cfg = _train_cfg(ctx, name)
        step = _latest_step(cfg.train.run_dir)
        if step is not None and step >= cfg.train.steps:
            return f"{cfg.train.run_dir} finished (checkpoint at step {step} of {cfg.train.steps})"
        return None

    def started(ctx):
        cfg = _train_cfg(ctx, name)
        step = _latest_step(cfg.train.run_dir)
        return None if step is None else f"{cfg.train.run_dir} has a checkpoint at step {step}: resuming it"

    def run(ctx):
        import jaxllm
        s = jaxllm.train(_train_cfg(ctx, name))
        if s.get("preempted"):
            raise Interrupted(f"{name} stopped at step {s['steps']} on a signal (checkpoint saved)")
        h = [r for r in s.get("history") or [] if "score" in r]
        if h:   # RL: what it maximised and what it is judged by
            true = (f", true reward {h[0]['true_reward']:.3f} -> {h[-1]['true_reward']:.3f}"
                    if "true_reward" in h[-1] else "")
            return (f"{s['run_dir']}: score {h[0]['score']:.3f} -> {h[-1]['score']:.3f}{true} "
                    f"(sampled), KL {h[-1]['kl']:.2f}, over {s['steps']} iterations")
        if s.get("first_loss") is None:
            return f"{s['run_dir']}: {s['steps']} steps"
        e = s.get("eval") or {}
        held = (f"; held-out accuracy {e['eval_accuracy']:.3f}" if name == "reward" and "eval_accuracy" in e
                else f"; held-out loss {e['eval_loss']:.3f}" if "eval_loss" in e else "")
        return f"{s['run_dir']}: loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} over {s['steps']} steps{held}"
    return Stage(name, what, command, outputs, done, run, started, cannot)


# The reward model and PPO start from a full model (checkpoint.init_from): the LoRA run's
# delta is folded into its base by `jaxllm convert --to hf`.
def _merge_args(ctx: Context) -> list[str]:
    return [_train_cfg(ctx, "sft").train.run_dir, "runs/sft", "--to", "hf"]


def _merge_done(ctx: Context) -> str | None:
    ok = os.path.exists("runs/sft/config.json") and glob.glob("runs/sft/*.safetensors")
    return "runs/sft holds the merged model" if ok else None


def _merge_run(ctx: Context) -> str:
    from jaxllm.interop.cli import convert
    src, dst, _, to = _merge_args(ctx)
    return convert(src, dst, to)


# ---------------------------------------------------------------------------- labelling
# InstructGPT's labelling step: the SFT model answers PPO's training prompts several times at
# PPO's own sampling settings, and the labeler (here the synthetic tasks' programmatic
# preference) ranks the answers. A reward model trained only on hand-written answer variants
# ranked the policy's own answers at chance (0.49, README "Results"), and PPO climbed its errors.
LABELS = {"train": ("synth/ppo/train.jsonl", "labels/train.jsonl"),
          "eval": ("synth/ppo/eval.jsonl", "labels/eval.jsonl")}


def _label_settings(ctx: Context, split: str) -> dict:
    """`jaxllm data rank` options of one split: PPO's own sampling settings."""
    rl = _train_cfg(ctx, "ppo").rl
    prompts, out = LABELS[split]
    return {"prompts": prompts, "out": out, "num": ctx.cfg.label_prompts if split == "train" else 0,
            "k": ctx.cfg.label_k, "temperature": rl.temperature, "top_k": rl.top_k,
            "max_new_tokens": rl.max_new_tokens, "seed": ctx.cfg.seed + (split == "eval")}


def _label_command(ctx: Context) -> str:
    return " && ".join(ctx.cli("data", "rank", "--model", "runs/sft", "--tokenizer", "tokenizer", *(
        x for k, v in _label_settings(ctx, split).items() for x in (f"--{k.replace('_', '-')}", str(v))),
        "--overwrite") for split in LABELS)   # as the stage runs it: its own files, rewritten on a rerun


def _label_done(ctx: Context) -> str | None:
    # each file is written whole under a temporary name and renamed; eval.jsonl last
    return "labels/ holds train.jsonl and eval.jsonl" if os.path.exists(LABELS["eval"][1]) else None


def _label_run(ctx: Context) -> str:
    from jaxllm.evaluation.source import load_model
    from jaxllm.rl.labels import label_file
    model = load_model("runs/sft", "tokenizer")
    # the demo's own files (a split written before a kill is sampled again)
    return "; ".join(label_file(model, **_label_settings(ctx, split), overwrite=True) for split in LABELS)


# ---------------------------------------------------------------------------- comparison, report
MODELS = {"pretrained": "runs/pretrain", "SFT": "runs/sft", "PPO": "runs/ppo"}
COMPARE_FILE = "compare/answers.json"


def _compare_run(ctx: Context) -> str:
    from jaxllm.demo.evaluate import compare
    ppo = _train_cfg(ctx, "ppo")
    res = compare(MODELS, "tokenizer", "synth/ppo/eval.jsonl", ctx.cfg.eval_prompts, ppo.rl.max_new_tokens,
                  temperature=ppo.rl.temperature, top_k=ppo.rl.top_k, samples=ctx.cfg.eval_samples)
    os.makedirs("compare", exist_ok=True)
    tmp = COMPARE_FILE + ".tmp"
    pathlib.Path(tmp).write_text(json.dumps(res, indent=1, ensure_ascii=False))
    os.replace(tmp, COMPARE_FILE)
    smp = res["sampled"]
    return "mean true reward on {} held-out prompts, greedy: {}; sampled ({} each): {}".format(
        len(res["prompts"]), ", ".join(f"{k} {v:+.3f}" for k, v in res["mean_true_reward"].items()),
        smp["samples"], ", ".join(f"{k} {v:+.3f}" for k, v in smp["mean_true_reward"].items()))


def _report_run(ctx: Context) -> str:
    from jaxllm.demo import report
    return report.write(ctx)


def _exists(path: str, what: str) -> Callable[[Context], str | None]:
    return lambda ctx: f"{path} {what}" if os.path.exists(path) else None


def all_stages(ctx: Context) -> list[Stage]:
    stages = [
        Stage("synth", "the synthetic corpora (pretraining, chat, rankings, PPO prompts)",
              lambda c: c.cli("data", "synth", *_synth_args(c)), lambda c: ["synth"], _synth_done, _synth_run),
        Stage("crawl", "a raw crawl-like corpus (languages, boilerplate, duplicates, blocked URLs, PII)",
              lambda c: c.demo_cli("crawl"), lambda c: ["raw"], _exists("raw/truth.jsonl", "holds the raw crawl"),
              _crawl_run),
        Stage("curate", "curation: URL filter, language ID, quality filters, PII, dedup",
              lambda c: c.cli("curate", *_curate_args(c)), lambda c: ["curated"], _curate_done, _curate_run),
        Stage("tokenizer", "the sentencepiece tokenizer on curated + synthetic pretraining text",
              lambda c: c.cli("tokenizer", "train", "--input", *TOKENIZER_INPUTS, "--vocab-size",
                              str(c.cfg.vocab_size), "--out", "tokenizer", "--seed", str(c.cfg.seed)),
              lambda c: ["tokenizer"], _tokenizer_done, _tokenizer_run),
        train_stage("pretrain", "pretraining on curated + synthetic documents"),
        train_stage("sft", "chat SFT (full)" if ctx.full_sft else "chat SFT (LoRA)"),
    ]
    if not ctx.full_sft:
        stages.append(Stage("merge", "the LoRA delta folded into its base -> runs/sft (HF safetensors)",
                            lambda c: c.cli("convert", *_merge_args(c)), lambda c: ["runs/sft"], _merge_done,
                            _merge_run))
    stages += [
        Stage("label", "the SFT model's own answers (PPO's sampling settings) ranked by the synthetic labeler",
              _label_command, lambda c: ["labels"],
              _label_done, _label_run, cannot=lambda c: c.no_reward_model),
        train_stage("reward", "the reward model on the written rankings and the labelled answers",
                    lambda c: c.no_reward_model),
        train_stage("ppo", "PPO against the reward model" if not ctx.no_reward_model
                    else "PPO against the programmatic reward"),
        Stage("compare", "held-out prompts answered greedily by the pretrained, SFT and PPO models",
              lambda c: c.demo_cli("compare"), lambda c: ["compare"],
              _exists(COMPARE_FILE, "holds the answers"), _compare_run),
        Stage("report", "report.md and its figures", lambda c: c.demo_cli("report"),
              lambda c: ["report.md", *glob.glob("report-*.png")], _exists("report.md", "is written"),
              _report_run),
    ]
    return stages


def remove(paths: list[str]) -> None:
    """Delete a stage's outputs (paths inside the demo directory) before it is redone."""
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
