"""Rankings of a policy's own answers, as InstructGPT's labelers made them: for each prompt,
sample K answers from the SFT model and rank them best first. The embedded synthetic tasks
stand in for the labelers with their programmatic preference (synthetic_tasks.score_response);
ties carry no ranking signal and are merged (a prompt left with fewer than 2 distinct answers is
skipped, counted).

A reward model trained only on hand-written answer variants scores the policy's samples off its
training distribution, and PPO then climbs those errors (reward hacking). Rankings of the
policy's own samples put the reward model's training data where PPO will look.

    jaxllm data rank --model runs/sft-tiny --prompts data/synth/ppo/train.jsonl --num 2000 --k 4 \
        --out data/synth/reward-onpolicy/train.jsonl
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax

from jaxllm.data.chat import chat_prompt, load_template
from jaxllm.data.synthetic_tasks import score_response
from jaxllm.errors import UserError
from jaxllm.evaluation.chat import end_of_turn_ids
from jaxllm.model.generate import generate
from jaxllm.rl import rollout as R


def rank_samples(params, model_cfg, tokenizer, records: Sequence[dict], *, k: int, temperature: float, top_k: int = 0,
                 max_new_tokens: int, seed: int, batch_prompts: int = 64, template=None) -> tuple[list[dict], int]:
    """-> (ranking records {"prompt", "task", "responses": best first, "scores"}, skipped).
    Prompts are rendered as PPO renders them (rl/rollout.py), so the reward model learns on
    the inputs PPO will score."""
    stops = end_of_turn_ids(tokenizer)
    out, skipped = [], 0
    for start in range(0, len(records), batch_prompts):
        chunk = records[start:start + batch_prompts]
        prompts = [chat_prompt(R.prompt_messages(r, f"prompt {start + i}"), tokenizer, template)
                   for i, r in enumerate(chunk)]
        gen = jax.device_get(generate(
            params, [p for p in prompts for _ in range(k)], model_cfg, max_new_tokens=max_new_tokens,
            key=jax.random.fold_in(jax.random.key(seed), start), temperature=temperature, top_k=top_k,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, stop_ids=stops, vocab_limit=tokenizer.vocab_size))
        texts, finished = R.response_texts(tokenizer, gen, stops), R.ended(gen, stops)
        for i, rec in enumerate(chunk):
            answers = {}
            for j in range(i * k, (i + 1) * k):
                text = texts[j].strip()
                # an answer cut at max_new_tokens is not a finished answer
                if finished[j] and text and text != rec["prompt"].strip():
                    answers[text] = score_response(rec["task"], text)
            by_score = {}
            for text, s in sorted(answers.items(), key=lambda x: -x[1]):
                by_score.setdefault(s, text)     # one answer per score: ties carry no ranking
            if len(by_score) < 2:
                skipped += 1
                continue
            ranked = sorted(by_score.items(), key=lambda x: -x[0])
            out.append({"prompt": rec["prompt"], "task": rec["task"],
                        "responses": [t for _, t in ranked], "scores": [s for s, _ in ranked]})
    return out, skipped


def check_output_path(path: str, prompts: str | None = None, overwrite: bool = False) -> None:
    """Before sampling: `path` can become a file (not a directory, not below a file), is not one
    of the prompt files, and replaces no file unless `overwrite`."""
    if os.path.isdir(path):
        raise UserError(f"data rank --out {path} is a directory; give a file name (e.g. {path}/train.jsonl)")
    if prompts is not None and os.path.exists(path):
        from jaxllm.data.sources import expand_paths
        try:
            inputs = expand_paths(prompts)
        except (OSError, ValueError):
            inputs = []   # read_prompt_records names the problem
        if any(os.path.samefile(path, p) for p in inputs):
            raise UserError(f"data rank --out {path} is one of the --prompts files: it would be replaced by the "
                            f"rankings; write them to another file")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"data rank --out {path} exists; pass --overwrite to replace it, or choose another file")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):   # the nearest existing folder above it
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"data rank --out {path}: {parent} is a file, not a directory")


def write_rankings(path: str, rankings: list[dict]) -> None:
    """Written whole under a temporary name, then renamed: a file at `path` is complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for r in rankings:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def label_file(model, prompts: str, out: str, *, num: int, k: int, temperature: float, top_k: int,
               max_new_tokens: int, seed: int, template: str = "", overwrite: bool = False) -> str:
    """`jaxllm data rank` (and the demo's label stage): rank a loaded model's own answers to the
    first `num` prompt records of `prompts` into `out` -> one line on what was made and what was
    left out."""
    check_output_path(out, prompts, overwrite)
    records, unusable = read_prompt_records(prompts, num)
    rankings, skipped = rank_samples(model.params, model.cfg, model.tokenizer, records, k=k,
                                     temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed,
                                     template=load_template(template, model.tokenizer))
    left = f"; {unusable} records without a 'task' and a 'prompt' left out" if unusable else ""
    if not rankings:
        raise UserError(f"data rank: no rankings to write to {out}: all {len(records)} prompts had fewer than 2 "
                        f"finished answers with distinct scores{left} (raise --k or --max-new-tokens)")
    write_rankings(out, rankings)
    return (f"{out}: {len(rankings)} rankings of {model.src}'s answers ({skipped} of {len(records)} prompts "
            f"skipped: fewer than 2 finished answers with distinct scores){left}")


def read_prompt_records(path: str, num: int) -> tuple[list[dict], int]:
    """-> (the first `num` (0: all) records with a 'task' and a 'prompt', how many records
    lacked them and were left out)."""
    from jaxllm.data.sources import expand_paths
    records = []
    for p in expand_paths(path):
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{p}:{n}: not a JSON record ({e.msg})") from None
    usable = [r for r in records if isinstance(r, dict) and isinstance(r.get("task"), dict)
              and isinstance(r.get("prompt"), str)]
    if not usable:
        raise UserError(f"{path}: no prompt records with a 'task' (the programmatic labeler needs it)")
    return (usable[:num] if num else usable), len(records) - len(usable)
