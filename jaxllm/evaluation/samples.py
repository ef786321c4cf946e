"""A few completions of fixed prompts, for the training loop to log at eval time: a look at
what the model writes, next to the loss curve."""
from __future__ import annotations

from typing import Sequence

import jax

from jaxllm.config import ModelConfig
from jaxllm.model.generate import generate_text


def sample_completions(params, model_cfg: ModelConfig, tokenizer, prompts: Sequence[str],
                       max_new_tokens: int, key: jax.Array, *, temperature: float = 1.0,
                       top_p: float = 1.0) -> list[dict]:
    """[{"prompt": text, "completion": text}, ...], one per prompt, in order.

    Sampled (temperature 1 by default: the model's own distribution, which shows what it has
    learnt better than greedy's loops); the same key gives the same completions, so samples
    logged at successive evals differ only by what training changed. Works on sharded params
    inside the training mesh. A completion ends at eos or after max_new_tokens tokens."""
    completions = generate_text(params, model_cfg, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                key=key, temperature=temperature, top_p=top_p)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
