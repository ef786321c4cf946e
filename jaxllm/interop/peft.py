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

Trainable token rows (lora.trainable_tokens, PEFT's `trainable_token_indices`): PEFT keeps the
rows whole, the base's row with the change in it, as `...embed_tokens.token_adapter.
trainable_tokens_delta` (n, d) and, for an untied head, `...lm_head.token_adapter.
trainable_tokens_delta` (n, d) (HF's lm_head.weight is our kernel transposed). Ours are
additive deltas, so both directions need the base's rows: save_peft/load_peft take `base=`.
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
from jaxllm.model import lora, tokens
from jaxllm.model.api import param_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json keys that do not change what the loaded weights compute.
_INFORMATIONAL = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                  "revision", "inference_mode", "init_lora_weights", "megatron_core", "qalora_group_size",
                  "exclude_modules", "layers_pattern", "ensure_weight_tying", "loftq_config",
                  "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                  "trainable_token_indices"}
TOKEN_ROWS = {"embed": PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta",
              "unembed": PREFIX + "lm_head.token_adapter.trainable_tokens_delta"}
_TOKEN_MODULES = {"embed": "embed_tokens", "unembed": "lm_head"}


def _base_rows(base: dict, ids) -> dict:
    """The base's embedding rows and (untied) LM-head rows of `ids`, (n, d) each, numpy."""
    ids = list(ids)
    out = {"embed": np.asarray(jax.device_get(base["embed"]["embedding"]))[ids]}
    if "lm_head" in base:
        out["unembed"] = np.asarray(jax.device_get(base["lm_head"]["kernel"]))[:, ids].T
    return out


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
              *, base_model_name_or_path: str | None = None, base: dict | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors that PEFT loads onto the HF
    export of the base (interop.hf.save_hf). Tensors keep the delta's dtype. A delta with
    trainable token rows needs `base` (the params it adapts): PEFT stores those rows whole."""
    from safetensors.numpy import save_file
    directory = pathlib.Path(directory)
    lora.check_config(lora_cfg)
    rows = delta.get("tokens")
    if rows is not None and base is None:
        raise CheckpointFormatError("this LoRA delta trains token rows (lora.trainable_tokens), which PEFT "
                                    "stores whole (base row + change): save_peft needs base=")
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
    if rows is not None:
        ids = tokens.ids_of(lora_cfg)
        tokens.check_rows(base, rows, ids)
        for k, whole in _base_rows(base, ids).items():
            tensors[TOKEN_ROWS[k]] = np.ascontiguousarray(whole + np.asarray(jax.device_get(rows[k])))
        config["trainable_token_indices"] = {_TOKEN_MODULES[k]: list(ids) for k in rows}
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


def load_peft(directory: str | pathlib.Path, model_cfg: ModelConfig, *, dtype: str | None = None,
              base: dict | None = None):
    """-> (delta, LoraConfig) from a PEFT LoRA directory, for a base with model_cfg.
    Factors are cast to `dtype` (default model_cfg.param_dtype, the dtype attach expects).
    Every tensor must be a lora_A/lora_B of a known matrix, present for every layer, with the
    shape the base needs; anything else is an error naming the tensor. An adapter with
    trainable_token_indices needs `base` (its rows are stored whole; ours are base + delta)."""
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
    token_ids = _token_indices(config, model_cfg, directory)
    if token_ids and base is None:
        raise CheckpointFormatError(f"{directory / CONFIG_FILE}: trainable_token_indices: PEFT stores those "
                                    "rows whole, so load_peft needs the base params (base=)")
    with safe_open(str(weights), framework="numpy") as fh:
        names = set(fh.keys())
        row_names = {TOKEN_ROWS["embed"]} | ({TOKEN_ROWS["unembed"]} if not model_cfg.tie_embeddings else set())
        rows = {}
        for k, name in TOKEN_ROWS.items():
            if name in names and token_ids:
                w = fh.get_tensor(name)
                if tuple(w.shape) != (len(token_ids), model_cfg.d_model):
                    raise CheckpointFormatError(f"{weights}: tensor '{name}' has shape {tuple(w.shape)}; "
                                                f"{len(token_ids)} token rows of d_model={model_cfg.d_model} "
                                                f"need {(len(token_ids), model_cfg.d_model)}")
                rows[k] = w
        if token_ids and "embed" not in rows:
            raise CheckpointFormatError(f"{weights}: tensor '{TOKEN_ROWS['embed']}' is missing "
                                        "(trainable_token_indices is set)")
        names -= row_names if token_ids else set()
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
    if token_ids:
        whole = _base_rows(base, token_ids)
        emb_dt = jnp.dtype(base["embed"]["embedding"].dtype)
        # a row PEFT does not hold (an untied head left alone) is the base's: no change
        delta["tokens"] = {k: jnp.asarray((rows[k] - v) if k in rows else np.zeros_like(v), emb_dt)
                           for k, v in whole.items()}
    lora_cfg = LoraConfig(r=r, alpha=float(config.get("lora_alpha", 8)),
                          rslora=bool(config.get("use_rslora", False)),
                          targets="layers/(" + "|".join(p.split("/", 1)[1].rsplit("/", 1)[0]
                                                         for p in present) + ")/kernel",
                          init="gaussian" if config.get("init_lora_weights") == "gaussian" else "peft",
                          dropout=float(config.get("lora_dropout", 0.0)), trainable_tokens=token_ids)
    return delta, lora_cfg


def _token_indices(config: dict, model_cfg: ModelConfig, directory: pathlib.Path) -> tuple[int, ...]:
    """The trainable token ids of adapter_config.json: a list (the input embedding's), or
    {"embed_tokens": ids[, "lm_head": the same ids]}; other layouts are refused by name."""
    spec = config.get("trainable_token_indices")
    if not spec:
        return ()
    where = f"{directory / CONFIG_FILE}: trainable_token_indices={spec!r}"
    if isinstance(spec, list):
        spec = {"embed_tokens": spec}
    if not isinstance(spec, dict) or "embed_tokens" not in spec or set(spec) - {"embed_tokens", "lm_head"}:
        raise CheckpointFormatError(f"{where}: only embed_tokens (and lm_head with the same ids) are read")
    ids = spec["embed_tokens"]
    if "lm_head" in spec and spec["lm_head"] != ids:
        raise CheckpointFormatError(f"{where}: embed_tokens and lm_head train different tokens, which "
                                    "jaxllm's rows (one id list for both) cannot hold")
    if not all(isinstance(i, int) and 0 <= i < model_cfg.vocab_size for i in ids):
        raise CheckpointFormatError(f"{where}: ids must be in [0, {model_cfg.vocab_size})")
    return tuple(ids)


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
