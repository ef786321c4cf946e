"""The same held-out prompts answered by each model, scored by the true reward.

Prompts are the first N records of the held-out PPO prompts (data/synth ppo eval), rendered
exactly as PPO renders them (rl/rollout.py: the chat template up to the assistant header).
Each model answers greedily, and `samples` times at the PPO run's rollout settings
(rl.temperature, rl.top_k: the distribution PPO optimises), with a fixed key; answers are at
most rl.max_new_tokens tokens and end at an end-of-turn token. The true reward is
synthetic_tasks.score_response, the programmatic preference PPO's logged `true_reward` uses.
"""
from __future__ import annotations

import json

import jax
import numpy as np

from jaxllm.data.chat import chat_prompt
from jaxllm.data.synthetic_tasks import score_response
from jaxllm.evaluation.chat import end_of_turn_ids
from jaxllm.evaluation.source import load_model
from jaxllm.model.generate import generate
from jaxllm.rl import rollout as R


def read_prompts(path: str, n: int) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            out.append(json.loads(line))
    return out


def answer(model, records: list[dict], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
           samples: int = 1, seed: int = 0) -> list[dict]:
    """[{"answer", "true_reward", "ended"}] of a loaded model: `samples` answers per record,
    record by record (greedy when temperature is 0)."""
    tok = model.tokenizer
    stops = end_of_turn_ids(tok)
    rows = [r for r in records for _ in range(samples)]
    prompts = [chat_prompt(R.prompt_messages(r, f"prompt {i}"), tok) for i, r in enumerate(rows)]
    gen = jax.device_get(generate(model.params, prompts, model.cfg, max_new_tokens=max_new_tokens,
                                  key=jax.random.key(seed), temperature=temperature, top_k=top_k,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=stops, vocab_limit=tok.vocab_size))
    texts = R.response_texts(tok, gen, stops)
    ended = R.ended(gen, stops)
    return [{"answer": t, "true_reward": score_response(r["task"], t), "ended": bool(e)}
            for r, t, e in zip(rows, texts, ended)]


def _means(rows: list[dict], kinds_of_rows: list[str], kinds: list[str]) -> tuple[float, dict]:
    by_task = {k: float(np.mean([a["true_reward"] for a, kk in zip(rows, kinds_of_rows) if kk == k]))
               for k in kinds}
    return float(np.mean([a["true_reward"] for a in rows])), by_task


def compare(models: dict[str, str], tokenizer: str, prompts_path: str, n: int, max_new_tokens: int, *,
            temperature: float, top_k: int, samples: int) -> dict:
    """For models {name: run dir / HF dir}: {"prompts": [...], "answers": {model: [greedy answer
    per prompt]}, "mean_true_reward" / "by_task" / "ended_fraction": {model: ...} of the greedy
    answers, and "sampled": the same three over `samples` answers per prompt at temperature,
    top_k}."""
    records = read_prompts(prompts_path, n)
    kinds = sorted({r["task"]["kind"] for r in records})
    res = {"prompts": records, "models": models, "max_new_tokens": max_new_tokens, "answers": {},
           "mean_true_reward": {}, "by_task": {}, "ended_fraction": {},
           "sampled": {"temperature": temperature, "top_k": top_k, "samples": samples,
                       "mean_true_reward": {}, "by_task": {}, "ended_fraction": {}}}
    for name, src in models.items():
        model = load_model(src, tokenizer)
        for out, rows, each in (
                (res, answer(model, records, max_new_tokens), 1),
                (res["sampled"], answer(model, records, max_new_tokens, temperature=temperature, top_k=top_k,
                                        samples=samples, seed=1), samples)):
            row_kinds = [r["task"]["kind"] for r in records for _ in range(each)]
            out["mean_true_reward"][name], out["by_task"][name] = _means(rows, row_kinds, kinds)
            out["ended_fraction"][name] = float(np.mean([a["ended"] for a in rows]))
            if each == 1:
                res["answers"][name] = rows
    return res
