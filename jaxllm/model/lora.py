"""LoRA (Hu et al. 2021) as a parameter-tree concern: the delta is a plain pytree of factors,
applied inside the layers as y = x W + s ((x A) B) with W frozen.

    delta = init_delta(base_params_or_shapes, lora_cfg, key)   # A random, B = 0
    params = attach(base, delta, lora_cfg)                     # what trunk / forward take
    step = make_train_step(loss_fn, optimizer, shardings, merge=make_merge(lora_cfg))
    state, metrics = step(state, batch, base)                  # state.params is the delta
    merged = merge(base, delta, lora_cfg)                      # W + s A B folded in (serving)

The delta mirrors the paths of the matrices it adapts, stacked along `layers` like them:
    {"layers": {"attn": {"q": {"kernel": {"a": (L, *in_dims, r), "b": (L, r, *out_dims)}}}}}
With lora.trainable_tokens the delta also holds {"tokens": rows} (model/tokens.py).
No dimension is flattened, so A keeps the logical names of the kernel's input dims and B those
of its output dims (delta_logical_axes) and LoRA shards like its base on every mesh preset.
Why never materialise W + s A B for training: autodiff would then build a full-size gradient
for every adapted matrix, the memory LoRA exists to save.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.config import LoraConfig, ModelConfig
from jaxllm.configlib import ConfigError
from jaxllm.model import tokens
from jaxllm.model.quant import QuantizedKernel
from jaxllm.model.transformer import LoraOptions

# How many leading dims of each kernel (after `layers`) are its input dims; the rest are
# output dims. Dense checks the factors' shapes against its own in/out dims at trace time,
# so a kernel added to the layer without an entry here fails loudly, not silently.
KERNEL_INPUT_DIMS = {"layers/attn/q/kernel": 1, "layers/attn/k/kernel": 1,
                     "layers/attn/v/kernel": 1, "layers/attn/o/kernel": 2,
                     "layers/mlp/gate/kernel": 1, "layers/mlp/up/kernel": 1,
                     "layers/mlp/down/kernel": 1}


# ---------------------------------------------------------------------------- paths
def path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def get_path(tree: dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def set_path(tree: dict, path: str, value) -> None:
    *head, last = path.split("/")
    for k in head:
        tree = tree.setdefault(k, {})
    tree[last] = value


def param_paths(base) -> list[str]:
    """Leaf paths; a quantized kernel (a QLoRA base) is one leaf at its kernel's path."""
    flat = jax.tree_util.tree_flatten_with_path(base, is_leaf=lambda x: isinstance(x, QuantizedKernel))[0]
    return [path_str(p) for p, _ in flat]


def scale(cfg: LoraConfig) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rslora (rank-stabilised, Kalajdzievski 2023)."""
    check_config(cfg)
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


def check_config(cfg: LoraConfig) -> None:
    if cfg.r <= 0:
        raise ConfigError(f"lora.r={cfg.r}: LoRA needs a rank r >= 1 (lora.r=0 means LoRA is off)")


def target_paths(base, cfg: LoraConfig) -> list[str]:
    """Paths of the kernels `cfg.targets` selects (re.fullmatch over "layers/attn/q/kernel"
    style paths). Matching nothing, or matching a parameter LoRA cannot adapt here, is an
    error that lists what it can adapt."""
    check_config(cfg)
    try:
        pattern = re.compile(cfg.targets)
    except re.error as e:
        raise ConfigError(f"lora.targets={cfg.targets!r} is not a valid regex: {e}") from None
    paths = param_paths(base)
    available = [p for p in paths if p in KERNEL_INPUT_DIMS]
    matched = [p for p in paths if pattern.fullmatch(p)]
    refused = [p for p in matched if p not in KERNEL_INPUT_DIMS]
    if refused:
        raise ConfigError(f"lora.targets={cfg.targets!r} matches {refused}, which LoRA does not "
                          f"adapt (only the layers' matrices: {available})")
    if not matched:
        raise ConfigError(f"lora.targets={cfg.targets!r} matches no parameter path (full match); "
                          f"available: {available}")
    return matched


def _split(path: str, shape: tuple[int, ...]) -> tuple[int, tuple, tuple]:
    """(n_layers, in_dims, out_dims) of a stacked kernel."""
    n_in = KERNEL_INPUT_DIMS[path]
    return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def factor_shapes(path: str, kernel_shape: tuple[int, ...], r: int) -> tuple[tuple, tuple]:
    """(A shape, B shape) for a stacked kernel: (L, *in, r), (L, r, *out)."""
    n, in_dims, out_dims = _split(path, kernel_shape)
    return (n, *in_dims, r), (n, r, *out_dims)


def delta_paths(delta) -> list[str]:
    """Kernel paths a delta adapts (each leaf pair {"a", "b"} under one kernel path)."""
    return sorted({p.rsplit("/", 1)[0] for p in param_paths(delta) if not p.startswith("tokens/")})


# ---------------------------------------------------------------------------- init and specs
def init_delta(base, cfg: LoraConfig, key: jax.Array) -> dict:
    """A fresh delta for base (params or ShapeDtypeStructs), in each kernel's dtype.
    A: Gaussian with std 1/r (init="gaussian", as PEFT's "gaussian") or PEFT's default
    kaiming_uniform(a=sqrt(5)) over fan_in = prod(in_dims), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (init="peft"); B = 0, so the adapted model starts as the base exactly. All A factors come
    from one flat draw, sliced in target-path order: one draw per kernel compiled ~0.5 s each
    on a CPU (see transformer.NormalPool)."""
    delta: dict = {}
    targets = target_paths(base, cfg)
    shapes = [factor_shapes(path, get_path(base, path).shape, cfg.r) for path in targets]
    total = sum(math.prod(a_shape) for a_shape, _ in shapes)
    if cfg.init == "gaussian":
        flat = jax.random.normal(key, (total,), jnp.float32)
    else:
        flat = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
    offset = 0
    for path, (a_shape, b_shape) in zip(targets, shapes):
        w = get_path(base, path)
        a = flat[offset:offset + math.prod(a_shape)].reshape(a_shape)
        offset += math.prod(a_shape)
        if cfg.init == "gaussian":
            a = a / cfg.r
        else:
            a = a / math.sqrt(math.prod(a_shape[1:-1]))     # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        set_path(delta, path, {"a": a.astype(w.dtype), "b": jnp.zeros(b_shape, w.dtype)})
    if cfg.trainable_tokens:
        delta["tokens"] = tokens.init_rows(base, tokens.ids_of(cfg))
    return delta


def delta_logical_axes(model_cfg: ModelConfig, cfg: LoraConfig) -> dict:
    """PartitionSpecs of logical names, same structure as init_delta's result: A takes the
    kernel's input-dim names + 'lora_rank', B 'lora_rank' + its output-dim names."""
    from jaxllm.model.api import param_logical_axes, param_shapes
    specs = param_logical_axes(model_cfg)
    out: dict = {}
    for path in target_paths(param_shapes(model_cfg), cfg):
        names = tuple(get_path(specs, path))
        n_in = KERNEL_INPUT_DIMS[path]
        set_path(out, path, {"a": P(*names[:1 + n_in], "lora_rank"),
                             "b": P(names[0], "lora_rank", *names[1 + n_in:])})
    if cfg.trainable_tokens:
        out["tokens"] = tokens.logical_axes(model_cfg.tie_embeddings)
    return out


# ---------------------------------------------------------------------------- use
def check_delta(base, delta, cfg: LoraConfig) -> None:
    """The delta adapts exactly cfg's targets with factors of rank cfg.r that fit base."""
    tokens.check_rows(base, delta.get("tokens"), tokens.ids_of(cfg))
    want = sorted(target_paths(base, cfg))
    have = delta_paths(delta)
    if have != want:
        raise ConfigError(f"the LoRA delta adapts {have} but lora.targets={cfg.targets!r} selects "
                          f"{want}: use the LoraConfig the delta was made with")
    for path in have:
        w, f = get_path(base, path), get_path(delta, path)
        if set(f) != {"a", "b"}:
            raise ConfigError(f"LoRA delta at {path}: keys {sorted(f)}, expected ['a', 'b']")
        a_shape, b_shape = factor_shapes(path, w.shape, cfg.r)
        if tuple(f["a"].shape) != a_shape or tuple(f["b"].shape) != b_shape:
            raise ConfigError(f"LoRA delta at {path}: A {tuple(f['a'].shape)}, B {tuple(f['b'].shape)}; "
                              f"kernel {tuple(w.shape)} with lora.r={cfg.r} needs A {a_shape}, B {b_shape}")


def attach(base: dict, delta: dict, cfg: LoraConfig) -> dict:
    """{**base, "lora": {**delta, "options": LoraOptions(scale, dropout)}}: what the model
    reads (model/transformer.py Dense). The options are a static pytree node (no leaves), so
    nothing but A and B is ever differentiated. Shapes are checked (at trace time under jit)."""
    if "lora" in base:
        raise ConfigError("these params already carry a LoRA delta (a 'lora' key): attach to the base")
    check_delta(base, delta, cfg)
    out = {**base, "lora": {**{k: v for k, v in delta.items() if k != "tokens"},
                            "options": LoraOptions(scale(cfg), cfg.dropout)}}
    return tokens.attach(out, delta["tokens"], tokens.ids_of(cfg)) if "tokens" in delta else out


def make_merge(cfg: LoraConfig):
    """merge(trainable_delta, frozen_base) -> params, for make_train_step(merge=...)."""
    check_config(cfg)

    def merge_fn(delta, base):
        return attach(base, delta, cfg)
    return merge_fn


def _fold(params: dict, delta: dict, cfg: LoraConfig, sign: float) -> dict:
    if "lora" in params or "tokens" in params:
        raise ConfigError("merge/unmerge take params without a 'lora' or 'tokens' key (the base, or a "
                          "merged model)")
    check_delta(params, delta, cfg)
    s = sign * scale(cfg)
    out = jax.tree.map(lambda x: x, params)    # new containers; arrays are shared
    for path in delta_paths(delta):
        w, f = get_path(params, path), get_path(delta, path)
        if isinstance(w, QuantizedKernel):    # a QLoRA base: the merged kernel is W' = deq(W) + s A B
            w = w.dequantize(w.dtype)
        n, r = w.shape[0], cfg.r
        a = f["a"].astype(jnp.float32).reshape(n, -1, r)
        b = f["b"].astype(jnp.float32).reshape(n, r, -1)
        ab = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
        set_path(out, path, (w.astype(jnp.float32) + s * ab).astype(w.dtype))
    if "tokens" in delta:
        out = tokens.fold(out, delta["tokens"], tokens.ids_of(cfg), sign)
    return out


def merge(params: dict, delta: dict, cfg: LoraConfig) -> dict:
    """Params with W + s A B folded into every adapted kernel: the same function as
    attach(params, delta, cfg) (up to rounding) at no extra cost per token; for serving and
    export, never for training (see the module docstring)."""
    return _fold(params, delta, cfg, 1.0)


def unmerge(merged: dict, delta: dict, cfg: LoraConfig) -> dict:
    """The inverse of merge: W = W' - s A B (exact up to fp32 rounding of W' in param dtype)."""
    return _fold(merged, delta, cfg, -1.0)
