"""A few completions of fixed prompts, for the training loop to log at eval time: a look at
what the model writes, next to the loss curve."""
from __future__ import annotations

from typing import Sequence

import jax

from jaxllm.config import ModelConfig
from jaxllm.configlib import ConfigError
from jaxllm.model.generate import decode_rows, generate


def _prompt_ids(tokenizer, prompts: Sequence[str], chat_template) -> list[list[int]]:
    """The prompts as generation sees them: a user turn up to the assistant header (chat
    template), else the text after bos (when the tokenizer has one)."""
    if chat_template is None:
        return [tokenizer.encode(p, add_bos=tokenizer.bos_id is not None) for p in prompts]
    from jaxllm.data.chat import chat_prompt
    return [chat_prompt([{"role": "user", "content": p}], tokenizer, chat_template) for p in prompts]


def check_sample_prompts(model_cfg: ModelConfig, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                         chat_template=None) -> None:
    """At start-up, not at the first evaluation after steps of training: every prompt plus
    train.sample_tokens must fit in the model's window."""
    for p, ids in zip(prompts, _prompt_ids(tokenizer, prompts, chat_template)):
        if len(ids) + max_new_tokens > model_cfg.max_seq_len:
            raise ConfigError(f"train.sample_prompts: {p[:40]!r} is {len(ids)} tokens, and with "
                              f"train.sample_tokens={max_new_tokens} that exceeds model.max_seq_len="
                              f"{model_cfg.max_seq_len}; lower train.sample_tokens or shorten the prompt")


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
    stops, eos = (), tokenizer.eos_id
    if chat_template is not None:
        from jaxllm.evaluation.chat import end_of_turn_ids
        stops, eos = end_of_turn_ids(tokenizer), None
    out = generate(params, _prompt_ids(tokenizer, prompts, chat_template), model_cfg, max_new_tokens=max_new_tokens,
                   key=key, temperature=temperature, top_p=top_p, eos_id=eos, pad_id=tokenizer.pad_id,
                   stop_ids=stops, vocab_limit=tokenizer.vocab_size)
    completions = decode_rows(tokenizer, out, stops)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
