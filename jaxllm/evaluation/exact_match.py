"""Held-out exact match of chat answers: for each conversation, the model answers its last
user turn greedily (the chat template up to the assistant header, stopped at end-of-turn) and
the answer counts when it equals the reference assistant message, whitespace-trimmed.
The embedded synthetic chat tasks (arithmetic, capitals, colours, counting, stories) have one
right answer each except stories, so this is the SFT learning measure.
"""
from __future__ import annotations

import json
from typing import Sequence

import jax
import numpy as np

from jaxllm.data.chat import chat_prompt, resolve_template
from jaxllm.data.sources import expand_paths
from jaxllm.errors import UserError
from jaxllm.evaluation.chat import end_of_turn_ids
from jaxllm.model.generate import generate, left_pad


def read_conversations(files: Sequence[str], limit: int = 0) -> list[list[dict]]:
    out = []
    for pattern in files:
        for path in expand_paths(pattern):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        out.append(json.loads(line)["messages"])
    if not out:
        raise UserError(f"no conversations in {list(files)}")
    return out[:limit] if limit else out


def chat_exact_match(params, model_cfg, tokenizer, conversations: list[list[dict]], *, template=None,
                     max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """{"exact_match", "n", "examples": first few (prompt, answer, reference)}."""
    template = resolve_template(tokenizer, template)
    stops = end_of_turn_ids(tokenizer)
    hits, examples = [], []
    items = []
    for msgs in conversations:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        items.append((chat_prompt(msgs[:last], tokenizer, template), msgs[last]["content"], msgs[last - 1]["content"]))
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        # prompt widths bucketed to 32 (and a short last chunk padded to batch_size with a copy of
        # its first prompt): a few compiled shapes per model, not one per chunk. A CI worker that
        # had compiled hundreds failed with "Failed to materialize symbols" (likely its memory-map
        # limit). Padding is never attended, so it changes no answer (fp32 tests: test_generate.py,
        # test_evaluation.py)
        prompts = [c[0] for c in chunk] + [chunk[0][0]] * (min(batch_size, len(items)) - len(chunk))
        tokens_bp, mask_bp = left_pad(prompts, tokenizer.pad_id, multiple=32)
        out = jax.device_get(generate(params, tokens_bp, model_cfg, max_new_tokens=max_new_tokens,
                                      key=jax.random.key(0), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                      stop_ids=stops, vocab_limit=tokenizer.vocab_size, prompt_mask=mask_bp))
        for (_, ref, question), toks, m in zip(chunk, np.asarray(out.tokens), np.asarray(out.mask)):
            answer = tokenizer.decode([int(t) for t, k in zip(toks, m) if k and int(t) not in stops]).strip()
            hits.append(answer == ref.strip())
            if len(examples) < 5:
                examples.append({"question": question, "answer": answer, "reference": ref})
    return {"exact_match": float(np.mean(hits)), "n": len(hits), "examples": examples}
