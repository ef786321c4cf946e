"""The same held-out prompts answered greedily by each model, scored by the true reward.

Prompts are the first N records of the held-out PPO prompts (data/synth ppo eval), rendered
exactly as PPO renders them (rl/rollout.py: the chat template up to the assistant header);
answers are greedy, at most the PPO run's rl.max_new_tokens tokens, and end at an
end-of-turn token; the true reward is synthetic_tasks.score_response, the programmatic
preference PPO's logged `true_reward` uses.
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


def answer(src: str, tokenizer: str, records: list[dict], max_new_tokens: int) -> list[dict]:
    """[{"answer", "true_reward", "ended"}] of the model at `src`, one per record, in order."""
    model = load_model(src, tokenizer)
    tok = model.tokenizer
    stops = end_of_turn_ids(tok)
    prompts = [chat_prompt(R.prompt_messages(r, f"prompt {i}"), tok) for i, r in enumerate(records)]
    gen = jax.device_get(generate(model.params, prompts, model.cfg, max_new_tokens=max_new_tokens,
                                  key=jax.random.key(0), temperature=0.0, eos_id=tok.eos_id,
                                  pad_id=tok.pad_id, stop_ids=stops, vocab_limit=tok.vocab_size))
    texts = R.response_texts(tok, gen, stops)
    ended = R.ended(gen, stops)
    return [{"answer": t, "true_reward": score_response(r["task"], t), "ended": bool(e)}
            for r, t, e in zip(records, texts, ended)]


def compare(models: dict[str, str], tokenizer: str, prompts_path: str, n: int, max_new_tokens: int) -> dict:
    """{"prompts": [...], "answers": {model: [...]}, "mean_true_reward": {model: float},
    "by_task": {model: {kind: mean}}} for models {name: run dir / HF dir}."""
    records = read_prompts(prompts_path, n)
    answers = {name: answer(src, tokenizer, records, max_new_tokens) for name, src in models.items()}
    kinds = sorted({r["task"]["kind"] for r in records})
    by_task = {name: {k: float(np.mean([a["true_reward"] for a, r in zip(rows, records)
                                        if r["task"]["kind"] == k])) for k in kinds}
               for name, rows in answers.items()}
    return {"prompts": records, "models": models, "max_new_tokens": max_new_tokens,
            "answers": answers, "by_task": by_task,
            "mean_true_reward": {name: float(np.mean([a["true_reward"] for a in rows]))
                                 for name, rows in answers.items()},
            "ended_fraction": {name: float(np.mean([a["ended"] for a in rows]))
                               for name, rows in answers.items()}}
