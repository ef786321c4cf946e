"""jaxllm: the LLM training pipeline in one small JAX codebase."""
from jaxllm.config import Config, ModelConfig, load_config  # noqa: F401
from jaxllm.configlib import ConfigError  # noqa: F401
from jaxllm.errors import RunError, UserError  # noqa: F401
from jaxllm.model import forward, init_cache, init_params, param_logical_axes, token_stats, trunk, unembed  # noqa: F401


def train(cfg: Config, batches=None) -> dict:
    """Run the recipe of cfg.train.objective; returns a summary (losses, eval, final state).
    `batches`: an iterator of this process's rows to train on instead of cfg.data."""
    from jaxllm.training.recipes import train as _train
    return _train(cfg, batches)


def __getattr__(name):
    # Heavier entry points load on first use so `import jaxllm` stays light.
    if name in ("load_hf", "save_hf"):
        from jaxllm.interop import hf
        return getattr(hf, name)
    if name in ("generate", "generate_text"):
        from jaxllm.model import generate as _generate
        return getattr(_generate, name)
    if name in ("load_peft", "save_peft"):
        from jaxllm.interop import peft
        return getattr(peft, name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
