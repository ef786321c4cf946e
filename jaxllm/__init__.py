"""jaxllm: the LLM training pipeline in one small JAX codebase."""
from jaxllm.config import Config, ModelConfig, load_config  # noqa: F401
from jaxllm.configlib import ConfigError  # noqa: F401
from jaxllm.model import forward, init_params, param_logical_axes  # noqa: F401


def train(cfg: Config) -> dict:
    """Run any objective from a config; returns a summary (losses, eval, final state)."""
    from jaxllm.training.loop import train as _train
    return _train(cfg)


def __getattr__(name):
    # Heavier entry points load on first use so `import jaxllm` stays light.
    if name in ("load_hf", "save_hf"):
        from jaxllm.interop import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
