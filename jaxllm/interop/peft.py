"""HF PEFT LoRA adapters <-> (LoRA delta, LoraConfig), tensor by tensor.

    save_peft("out_dir", model_cfg, delta, lora_cfg)     # PeftModel.from_pretrained loads it
    delta, lora_cfg = load_peft("adapter_dir", model_cfg)
    params = lora.attach(base_params, delta, lora_cfg)  # base from interop.hf.load_hf

PEFT's format: adapter_config.json (r, lora_alpha, use_rslora, target_modules, ...) and
adapter_model.safetensors with one tensor per layer and matrix, named
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`. A torch Linear computes
x @ W.T, so lora_A.weight is (r, in_features) and lora_B.weight (out_features, r), with the
multi-dim in/out of our kernels flattened row-major exactly as interop/hf.py flattens the
kernels (q: (d, heads, head_dim) here is (heads*head_dim, d) there; RoPE layouts already match).
Only plain LoRA is read: DoRA, per-module ranks/alphas, layer subsets, biases and saved extra
modules are refused by name rather than dropped.
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import LoraConfig, ModelConfig
from jaxllm.interop.hf import CheckpointFormatError, _layer_map
from jaxllm.model import lora
from jaxllm.model.api import param_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json keys that do not change what the loaded weights compute.
_INFORMATIONAL = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                  "revision", "inference_mode", "init_lora_weights", "megatron_core", "qalora_group_size",
                  "exclude_modules", "layers_pattern", "ensure_weight_tying", "loftq_config",
                  "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules"}


def _modules(cfg: ModelConfig) -> dict[str, str]:
    """Our kernel path -> HF module template, e.g. "layers/attn/q/kernel" ->
    "model.layers.{i}.self_attn.q_proj" (from interop/hf.py's name table)."""
    out = {}
    for path, template, _, _ in _layer_map(cfg):
        key = "/".join(("layers",) + path)
        if key in lora.KERNEL_INPUT_DIMS:
            out[key] = template.removesuffix(".weight")
    return out


def _short(template: str) -> str:
    return template.rsplit(".", 1)[-1]          # "q_proj"


def tensor_name(template: str, layer: int, factor: str) -> str:
    return f"{PREFIX}{template.format(i=layer)}.lora_{factor}.weight"


# ---------------------------------------------------------------- writing

def save_peft(directory: str | pathlib.Path, model_cfg: ModelConfig, delta: dict, lora_cfg: LoraConfig,
              *, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors that PEFT loads onto the HF
    export of the base (interop.hf.save_hf). Tensors keep the delta's dtype."""
    from safetensors.numpy import save_file
    directory = pathlib.Path(directory)
    lora.check_config(lora_cfg)
    if "tokens" in delta:
        # PEFT stores trainable tokens as full rows (base + delta), which needs the base here
        raise CheckpointFormatError("this LoRA delta trains token rows (lora.trainable_tokens), which the "
                                    "PEFT export does not write yet: export the merged model with "
                                    "`jaxllm convert RUN DST --to hf`")
    modules = _modules(model_cfg)
    paths = lora.delta_paths(delta)
    tensors = {}
    for path in paths:
        f = lora.get_path(delta, path)
        a, b = np.asarray(jax.device_get(f["a"])), np.asarray(jax.device_get(f["b"]))
        n, r = a.shape[0], a.shape[-1]
        if r != lora_cfg.r or n != model_cfg.n_layers:
            raise CheckpointFormatError(f"LoRA delta at {path}: A {a.shape} is not {model_cfg.n_layers} "
                                        f"layers of rank lora.r={lora_cfg.r}")
        for i in range(n):
            tensors[tensor_name(modules[path], i, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[tensor_name(modules[path], i, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": lora_cfg.r, "lora_alpha": alpha, "use_rslora": lora_cfg.rslora,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": sorted(_short(modules[p]) for p in paths),
        "init_lora_weights": True if lora_cfg.init == "peft" else "gaussian",
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "inference_mode": True,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------- reading

def _read_config(directory: pathlib.Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise CheckpointFormatError(f"{directory}: no {CONFIG_FILE} (expected a PEFT adapter directory)")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointFormatError(f"{path}: peft_type={config['peft_type']!r}; only LORA adapters are read")
    unsupported = {k: v for k, v in config.items()
                   if k not in _INFORMATIONAL and v not in (None, False, {}, [], "none")}
    if unsupported:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
        raise CheckpointFormatError(f"{path}: {listed} not supported (plain LoRA on all layers only)")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        # PiSSA / OLoRA / LoftQ / EVA ... adapters belong to a base modified at their init
        raise CheckpointFormatError(f"{path}: init_lora_weights={init!r}: this adapter expects a base "
                                    "changed by its init; convert it with PEFT first "
                                    "(save_pretrained(path_initial_model_for_weight_conversion=...))")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise CheckpointFormatError(f"{path}: r={config.get('r')!r}, expected a positive integer")
    return config


def load_peft(directory: str | pathlib.Path, model_cfg: ModelConfig, *, dtype: str | None = None):
    """-> (delta, LoraConfig) from a PEFT LoRA directory, for a base with model_cfg.
    Factors are cast to `dtype` (default model_cfg.param_dtype, the dtype attach expects).
    Every tensor must be a lora_A/lora_B of a known matrix, present for every layer, with the
    shape the base needs; anything else is an error naming the tensor."""
    from safetensors import safe_open
    directory = pathlib.Path(directory)
    config = _read_config(directory)
    r = config["r"]
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        other = sorted(p.name for p in directory.glob("adapter_model.*"))
        raise CheckpointFormatError(f"{directory}: no {WEIGHTS_FILE}" + (f" (found {other}; only "
                                    "safetensors is read)" if other else ""))
    modules = _modules(model_cfg)
    by_name = {tensor_name(t, i, f): (path, i, f) for path, t in modules.items()
               for i in range(model_cfg.n_layers) for f in "AB"}
    dt = jnp.dtype(dtype or model_cfg.param_dtype)
    with safe_open(str(weights), framework="numpy") as fh:
        names = set(fh.keys())
        unknown = sorted(names - set(by_name))
        if unknown:
            example = tensor_name(modules["layers/attn/q/kernel"], 0, "A")
            raise CheckpointFormatError(f"{weights}: tensors {unknown[:4]} ({len(unknown)} in all) are not "
                                        f"LoRA factors of this {model_cfg.n_layers}-layer model's matrices "
                                        f"(expected names like {example})")
        present = sorted({by_name[n][0] for n in names}, key=list(modules).index)
        _check_targets(config, [_short(modules[p]) for p in present], directory)
        base_shapes = param_shapes(model_cfg)
        delta: dict = {}
        for path in present:
            a_shape, b_shape = lora.factor_shapes(path, lora.get_path(base_shapes, path).shape, r)
            fan_in, fan_out = math.prod(a_shape[1:-1]), math.prod(b_shape[2:])
            a = np.empty(a_shape, dt)
            b = np.empty(b_shape, dt)
            for i in range(model_cfg.n_layers):
                for f, want, dst, unflat in (("A", (r, fan_in), a, lambda w: w.T.reshape(a_shape[1:])),
                                             ("B", (fan_out, r), b, lambda w: w.T.reshape(b_shape[1:]))):
                    name = tensor_name(modules[path], i, f)
                    if name not in names:
                        raise CheckpointFormatError(f"{weights}: tensor '{name}' is missing (every layer "
                                                    f"needs lora_A and lora_B of {_short(modules[path])})")
                    w = fh.get_tensor(name)
                    if tuple(w.shape) != want:
                        raise CheckpointFormatError(
                            f"{weights}: tensor '{name}' has shape {tuple(w.shape)}; the base "
                            f"({_short(modules[path])}: in {fan_in}, out {fan_out}) with r={r} needs {want}")
                    dst[i] = unflat(w).astype(dt)
            lora.set_path(delta, path, {"a": jnp.asarray(a), "b": jnp.asarray(b)})
    lora_cfg = LoraConfig(r=r, alpha=float(config.get("lora_alpha", 8)),
                          rslora=bool(config.get("use_rslora", False)),
                          targets="layers/(" + "|".join(p.split("/", 1)[1].rsplit("/", 1)[0]
                                                         for p in present) + ")/kernel",
                          init="gaussian" if config.get("init_lora_weights") == "gaussian" else "peft",
                          dropout=float(config.get("lora_dropout", 0.0)))
    return delta, lora_cfg


def _check_targets(config: dict, present: list[str], directory: pathlib.Path) -> None:
    """target_modules (a list) must name exactly the matrices the file has tensors for; a
    regex string or "all-linear" is PEFT's to expand, so the tensors decide."""
    listed = config.get("target_modules")
    if isinstance(listed, list):
        missing = sorted(set(listed) - set(present))
        extra = sorted(set(present) - set(listed))
        if missing or extra:
            raise CheckpointFormatError(
                f"{directory / CONFIG_FILE}: target_modules {sorted(listed)} but {WEIGHTS_FILE} holds "
                f"factors of {present}" + (f" (no tensors for {missing})" if missing else "")
                + (f" (tensors PEFT would not load: {extra})" if extra else ""))
