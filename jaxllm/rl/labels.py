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
import numpy as np

from jaxllm.data.chat import chat_prompt
from jaxllm.data.synthetic_tasks import score_response
from jaxllm.errors import UserError
from jaxllm.evaluation.chat import end_of_turn_ids
from jaxllm.model.generate import generate


def rank_samples(params, model_cfg, tokenizer, records: Sequence[dict], *, k: int, temperature: float,
                 max_new_tokens: int, seed: int, batch_prompts: int = 64) -> tuple[list[dict], int]:
    """-> (ranking records {"prompt", "task", "responses": best first, "scores"}, skipped)."""
    stops = end_of_turn_ids(tokenizer)
    out, skipped = [], 0
    for start in range(0, len(records), batch_prompts):
        chunk = records[start:start + batch_prompts]
        prompts = [chat_prompt([{"role": "user", "content": r["prompt"]}], tokenizer) for r in chunk]
        gen = jax.device_get(generate(
            params, [p for p in prompts for _ in range(k)], model_cfg, max_new_tokens=max_new_tokens,
            key=jax.random.fold_in(jax.random.key(seed), start), temperature=temperature,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, stop_ids=stops, vocab_limit=tokenizer.vocab_size))
        for i, rec in enumerate(chunk):
            answers = {}
            for j in range(i * k, (i + 1) * k):
                toks, m = np.asarray(gen.tokens[j]), np.asarray(gen.mask[j])
                if not (m.sum() and int(toks[m.sum() - 1]) in stops):
                    continue                     # cut at max_new_tokens: not a finished answer
                text = tokenizer.decode([int(t) for t, b in zip(toks, m) if b and int(t) not in stops]).strip()
                if text and text != rec["prompt"].strip():
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


def write_rankings(path: str, rankings: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in rankings:
            f.write(json.dumps(r) + "\n")


def read_prompt_records(path: str, num: int) -> list[dict]:
    from jaxllm.data.sources import expand_paths
    records = []
    for p in expand_paths(path):
        with open(p) as f:
            records += [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if isinstance(r.get("task"), dict) and isinstance(r.get("prompt"), str)]
    if not records:
        raise UserError(f"{path}: no prompt records with a 'task' (the programmatic labeler needs it)")
    return records[:num] if num else records
