"""`jaxllm.train(cfg)`: the recipe of cfg.train.objective. Each recipe is a thin driver over
training/run.py (setup) and training/loop.py (the loop), in its own module."""
from __future__ import annotations

import importlib

from jaxllm import xla_flags
from jaxllm.config import Config
from jaxllm.configlib import ConfigError

RECIPES = {
    "clm": "jaxllm.training.pretrain", "mlm": "jaxllm.training.pretrain",
    "sft": "jaxllm.training.pretrain",
    "reward": "jaxllm.training.reward",
    "ppo": "jaxllm.training.rl", "grpo": "jaxllm.training.rl", "dpo": "jaxllm.training.dpo",
}


def train(cfg: Config, batches=None) -> dict:
    name = cfg.train.objective
    line = xla_flags.apply(cfg.model)       # before the first computation starts the backend
    if line:
        print(line, flush=True)
    try:
        module = importlib.import_module(RECIPES[name])
    except ModuleNotFoundError as e:
        if e.name != RECIPES[name]:
            raise
        raise ConfigError(f"train.objective={name}: its recipe ({RECIPES[name]}) is not built yet") from None
    if batches is not None:
        return module.train(cfg, batches)
    return module.train(cfg)
