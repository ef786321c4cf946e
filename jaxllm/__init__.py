"""jaxllm: the LLM training pipeline in one small JAX codebase."""
from jaxllm.config import Config, ModelConfig, load_config  # noqa: F401
from jaxllm.configlib import ConfigError  # noqa: F401
from jaxllm.model import forward, init_params, param_logical_axes  # noqa: F401


def __getattr__(name):
    # Heavier entry points load on first use so `import jaxllm` stays light.
    if name in ("load_hf", "save_hf"):
        from jaxllm.interop import hf
        return getattr(hf, name)
    if name == "train":
        from jaxllm.train.loop import train
        return train
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
