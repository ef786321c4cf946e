"""report.md and its figures (report-*.png) in the demo directory, from the files the stages
wrote: curated/report.json, raw/truth.jsonl, each run's metrics.jsonl, compare/answers.json
and stages.json. Only what ran is reported: a missing piece is said, never filled in."""
from __future__ import annotations

import glob
import json
import os
from collections import Counter

import numpy as np

from jaxllm.configlib import REPO_CONFIGS
from jaxllm.demo.stages import COMPARE_FILE, LABELS, Context, all_stages, recipe

MODEL_ORDER = ("pretrained", "SFT", "PPO")


# ---------------------------------------------------------------------------- reading
def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _jsonl(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def run_dirs(ctx: Context) -> dict[str, str]:
    from jaxllm.config import load_config
    return {s: load_config(*recipe(ctx, s)).train.run_dir for s in ("pretrain", "sft", "reward", "ppo")}


def metrics(run_dir: str) -> list[dict]:
    return _jsonl(os.path.join(run_dir, "metrics.jsonl"))


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def last(rows: list[dict], key: str):
    vals = series(rows, key)[1]
    return vals[-1] if vals else None


def planted_table(tokenizer_dir: str) -> list[tuple[str, int, int, int, int]]:
    """(category, raw docs, kept docs, raw tokens, kept tokens) of the planted crawl."""
    from jaxllm.data.tokenizer import load_tokenizer
    truth = {r["id"]: r["category"] for r in _jsonl("raw/truth.jsonl")}
    raw = [r for p in sorted(glob.glob("raw/crawl-*.jsonl")) for r in _jsonl(p)]
    kept = [r for p in sorted(glob.glob("curated/part-*.jsonl")) for r in _jsonl(p)]
    if not truth or not raw or not kept or not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.model")):
        return []
    tok = load_tokenizer(tokenizer_dir)
    docs, toks = Counter(), Counter()
    for tag, rows in (("raw", raw), ("kept", kept)):
        for r, ids in zip(rows, tok.encode_batch([r["text"] for r in rows])):
            docs[tag, truth[r["id"]]] += 1
            toks[tag, truth[r["id"]]] += len(ids)
    from jaxllm.demo.crawl import CATEGORIES
    return [(c, docs["raw", c], docs["kept", c], toks["raw", c], toks["kept", c]) for c in CATEGORIES
            if docs["raw", c]]


# ---------------------------------------------------------------------------- figures
def _figures(ctx: Context, runs: dict[str, str], cur: dict | None, cmp: dict | None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(name, dpi=80)
        plt.close(fig)
        made.append(name)

    if cur:
        from jaxllm.curate.report import stages_figure
        save(stages_figure(cur, plt), "report-curation.png")
    for stage, title in (("pretrain", "pretraining"), ("sft", "SFT")):
        rows = metrics(runs[stage])
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*series(rows, "loss"), label="train loss")
        if series(rows, "eval_loss")[0]:
            ax.plot(*series(rows, "eval_loss"), "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_title(f"{title} loss")
        ax.legend()
        save(fig, f"report-{stage}.png")
    rows = metrics(runs["reward"])
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*series(rows, "accuracy"), label="train batch")
        ax.plot(*series(rows, "eval_accuracy"), "o-", label="held-out rankings")
        ax.set_xlabel("step")
        ax.set_title("reward model pairwise accuracy")
        ax.legend()
        save(fig, "report-reward.png")
    rows = [r for r in metrics(runs["ppo"]) if r["step"] > 0 and "score" in r]
    if rows:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        a.plot(*series(rows, "score"), label="score (what PPO maximises)")
        if series(rows, "true_reward")[0]:
            a.plot(*series(rows, "true_reward"), label="true reward (programmatic)")
        evals = [r for r in metrics(runs["ppo"]) if "eval_true_reward" in r]
        if evals:
            a.plot(*series(evals, "eval_true_reward"), "o-", label="held-out, greedy")
        a.set_xlabel("iteration")
        a.set_title("PPO reward (sampled responses)")
        a.legend(fontsize=8)
        b.plot(*series(rows, "kl"), color="tab:red")
        b.set_xlabel("iteration")
        b.set_title("KL to the SFT policy (nats per response)")
        save(fig, "report-ppo.png")
    if cmp:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        kinds = sorted(next(iter(cmp["by_task"].values())))
        w = 0.8 / len(cmp["by_task"])
        for j, (name, by) in enumerate(cmp["by_task"].items()):
            ax.bar(np.arange(len(kinds)) + j * w, [by[k] for k in kinds], w, label=name)
        ax.set_xticks(np.arange(len(kinds)) + 0.4 - w / 2, kinds)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("mean true reward")
        ax.set_title(f"held-out prompts by task ({len(cmp['prompts'])} prompts, greedy)")
        ax.legend(fontsize=8)
        save(fig, "report-compare.png")
    return made


# ---------------------------------------------------------------------------- text
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)"


def _f(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_lines(ctx: Context) -> list[str]:
    """Three lines: the data, the training stages, the held-out comparison."""
    runs = run_dirs(ctx)
    cur = _json("curated/report.json")
    pre, sft, rm, ppo = (metrics(runs[s]) for s in ("pretrain", "sft", "reward", "ppo"))
    cmp = _json(COMPARE_FILE)
    data = (f"curation kept {cur['output']['docs']} of {cur['input']['records']} raw documents "
            f"({cur['output']['docs'] / max(cur['input']['records'], 1):.0%})" if cur else "curation: no report")
    data += f"; pretraining loss {_f(series(pre, 'loss')[1][0] if pre else None)} -> {_f(last(pre, 'loss'))}" \
            f" (held-out {_f(last(pre, 'eval_loss'))})"
    kind = "full" if ctx.full_sft else "LoRA"
    rm_text = (f"reward model held-out accuracy {_f(last(rm, 'eval_accuracy'))}" if rm
               else f"no reward model ({ctx.no_reward_model})")
    ppo_rows = [r for r in ppo if "kl" in r]
    train = (f"SFT ({kind}) held-out loss {_f(last(sft, 'eval_loss'))}; {rm_text}; "
             f"PPO {len(ppo_rows)} iterations, final KL {_f(last(ppo_rows, 'kl'), '.2f')}")
    if cmp:
        m, ms = cmp["mean_true_reward"], cmp["sampled"]["mean_true_reward"]
        held = (f"mean true reward on {len(cmp['prompts'])} held-out prompts, greedy: "
                + ", ".join(f"{k} {m[k]:+.3f}" for k in MODEL_ORDER if k in m)
                + f"; sampled as PPO samples ({cmp['sampled']['samples']} each): "
                + ", ".join(f"{k} {ms[k]:+.3f}" for k in MODEL_ORDER if k in ms))
    else:
        held = "held-out comparison: not made"
    return [data, train, held]


def write(ctx: Context) -> str:
    runs = run_dirs(ctx)
    cur = _json("curated/report.json")
    cmp = _json(COMPARE_FILE)
    times = _json("stages.json") or {}
    figs = _figures(ctx, runs, cur, cmp)
    sizes = os.path.relpath(ctx.cfg_path, REPO_CONFIGS.parent)
    L = [f"# jaxllm demo ({'quick' if ctx.quick else 'full'} sizes: {sizes}, "
         f"{'full' if ctx.full_sft else 'LoRA'} SFT)", ""]
    L += [f"- {line}" for line in summary_lines(ctx)] + [""]
    L += ["## Stages", "", f"Run from `{ctx.out}`; each command reruns its stage alone.", "",
          "| stage | what | seconds | command |", "|---|---|---|---|"]
    for st in all_stages(ctx):
        t = times.get(st.name, {})
        secs = f"{t['seconds']:.1f}" if "seconds" in t else t.get("status", "this run")
        if t.get("runs", 1) > 1:
            secs += f" ({t['runs']} runs: resumed)"
        if t.get("status") == "skipped":
            secs = f"skipped: {t['why']}"
        L.append(f"| {st.name} | {st.what} | {secs} | `{st.command(ctx)}` |")
    L += ["", "## 1. Curation", ""]
    if cur:
        L += ["Documents per filter (curated/report.json):", "",
              "| filter | in | removed | kept | why removed |", "|---|---|---|---|---|"]
        for s in cur["stages"]:
            why = ", ".join(f"{k} {v}" for k, v in s["removed"].items()) or "-"
            L.append(f"| {s['stage']} | {s['in']} | {sum(s['removed'].values())} | {s['kept']} | {why} |")
        L += ["", f"Lines removed inside kept documents: {cur.get('lines_removed') or 'none'}; "
                  f"PII replaced: {cur.get('pii_replaced') or 'none'}.", ""]
        rows = planted_table("tokenizer")
        if rows:
            L += ["What curation kept of each planted kind of document (tokens counted with the demo's "
                  "tokenizer; curate's report.json counts documents per filter, not tokens):", "",
                  "| planted kind | raw docs | kept docs | raw tokens | kept tokens |", "|---|---|---|---|---|"]
            for c, d0, d1, t0, t1 in rows:
                L.append(f"| {c} | {d0} | {d1} | {t0} | {t1} |")
            tot = [sum(r[i] for r in rows) for i in range(1, 5)]
            L += [f"| all | {tot[0]} | {tot[1]} | {tot[2]} | {tot[3]} |", "",
                  "A planted copy and its original are the same text to dedup, which keeps whichever "
                  "comes first in input order: a kept \"duplicate\" stands for its removed original.", ""]
        if "report-curation.png" in figs:
            L += ["![curation](report-curation.png)", ""]
    else:
        L += ["No curation report (the curate stage did not finish).", ""]
    for n, (stage, title) in enumerate((("pretrain", "Pretraining"), ("sft", "SFT")), 2):
        rows = metrics(runs[stage])
        L += [f"## {n}. {title}", ""]
        if rows:
            L += [f"Run dir `{runs[stage]}`: train loss {_f(series(rows, 'loss')[1][0])} -> {_f(last(rows, 'loss'))} "
                  f"over {series(rows, 'loss')[0][-1]} steps; held-out loss {_f(last(rows, 'eval_loss'))}.", "",
                  f"![{stage}](report-{stage}.png)", ""]
        else:
            L += ["Not trained.", ""]
    rm = metrics(runs["reward"])
    L += ["## 4. Reward model", ""]
    if rm:
        labels = {split: sum(1 for _ in open(path, encoding="utf-8")) if os.path.exists(path) else 0
                  for split, (_, path) in LABELS.items()}
        L += [f"Trained on the hand-written answer variants (synth/reward) and {labels['train']} rankings of the "
              f"SFT model's own sampled answers (labels/train.jsonl, the label stage); held out: their eval "
              f"splits ({labels['eval']} rankings of own answers to the held-out prompts).", "",
              f"Run dir `{runs['reward']}`: held-out pairwise accuracy {_f(last(rm, 'eval_accuracy'))} "
              f"on {_f(last(rm, 'eval_pairs'), '.0f')} pairs (train batch {_f(last(rm, 'accuracy'))}).", "",
              "![reward](report-reward.png)", ""]
    else:
        L += [f"Not trained: {ctx.no_reward_model or 'the stage did not finish'}.", ""]
    L += ["## 5. PPO", ""]
    ppo = [r for r in metrics(runs["ppo"]) if "kl" in r]
    if ppo:
        scorer = ("the reward model" if not ctx.no_reward_model
                  else f"the programmatic reward ({ctx.no_reward_model})")
        L += [f"Run dir `{runs['ppo']}`, scored by {scorer}: {len(ppo)} iterations; score "
              f"{_f(ppo[0]['score'])} -> {_f(ppo[-1]['score'])}, true reward {_f(ppo[0].get('true_reward'))} -> "
              f"{_f(ppo[-1].get('true_reward'))} (sampled), KL {_f(ppo[-1]['kl'], '.2f')}.", "",
              "![ppo](report-ppo.png)", ""]
    else:
        L += ["Not trained.", ""]
    L += ["## 6. The same held-out prompts, three models", ""]
    if cmp:
        names = [k for k in MODEL_ORDER if k in cmp["answers"]]
        kinds = sorted(next(iter(cmp["by_task"].values())))
        smp = cmp["sampled"]
        L += [f"{len(cmp['prompts'])} held-out PPO prompts (synth/ppo/eval.jsonl); answers of at most "
              f"{cmp['max_new_tokens']} tokens, greedy, and {smp['samples']} sampled per prompt as PPO samples "
              f"(temperature {smp['temperature']}, top-k {smp['top_k']}: the distribution PPO optimises); "
              f"true reward = synthetic_tasks.score_response.", "",
              "| model | answers | mean true reward | ended by itself | " + " | ".join(kinds) + " |",
              "|---|---|---|---|" + "---|" * len(kinds)]
        for tag, c in (("greedy", cmp), ("sampled", smp)):
            for k in names:
                by_task = " | ".join(f"{c['by_task'][k][t]:+.2f}" for t in kinds)
                L.append(f"| {k} (`{cmp['models'][k]}`) | {tag} | {c['mean_true_reward'][k]:+.3f} | "
                         f"{c['ended_fraction'][k]:.0%} | {by_task} |")
        L += ["", "![compare](report-compare.png)", "",
              "| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i, p in enumerate(cmp["prompts"][:ctx.cfg.eval_show]):
            L.append(f"| {_cell(p['prompt'])} | " + " | ".join(
                f"{_cell(cmp['answers'][k][i]['answer'])} **({cmp['answers'][k][i]['true_reward']:+.2f})**"
                for k in names) + " |")
        L.append("")
    else:
        L += ["Not made (the compare stage did not finish).", ""]
    with open("report.md.tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(L))
    os.replace("report.md.tmp", "report.md")
    return f"report.md and {len(figs)} figures ({', '.join(figs)})"
