"""A few completions of fixed prompts, for the training loop to log at eval time: a look at
what the model writes, next to the loss curve."""
from __future__ import annotations

from typing import Sequence

import jax

from jaxllm.config import ModelConfig
from jaxllm.model.generate import decode_rows, generate, generate_text


def sample_completions(params, model_cfg: ModelConfig, tokenizer, prompts: Sequence[str],
                       max_new_tokens: int, key: jax.Array, *, temperature: float = 1.0,
                       top_p: float = 1.0, chat_template=None) -> list[dict]:
    """[{"prompt": text, "completion": text}, ...], one per prompt, in order.

    Sampled (temperature 1 by default: the model's own distribution, which shows what it has
    learnt better than greedy's loops); the same key gives the same completions, so samples
    logged at successive evals differ only by what training changed. Works on sharded params
    inside the training mesh. A completion ends at eos or after max_new_tokens tokens.
    chat_template (a data.chat.ChatTemplate; SFT runs): each prompt is a user turn rendered with
    it up to the assistant header, as SFT trained, and the answer ends at an end-of-turn token."""
    if chat_template is None:
        completions = generate_text(params, model_cfg, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                    key=key, temperature=temperature, top_p=top_p)
    else:
        from jaxllm.data.chat import chat_prompt
        from jaxllm.evaluation.chat import end_of_turn_ids
        stops = end_of_turn_ids(tokenizer)
        ids = [chat_prompt([{"role": "user", "content": p}], tokenizer, chat_template) for p in prompts]
        out = generate(params, ids, model_cfg, max_new_tokens=max_new_tokens, key=key, temperature=temperature,
                       top_p=top_p, eos_id=None, pad_id=tokenizer.pad_id, stop_ids=stops,
                       vocab_limit=tokenizer.vocab_size)
        completions = decode_rows(tokenizer, out, stops)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
