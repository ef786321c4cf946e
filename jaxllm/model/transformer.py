"""The decoder layer of a Llama-family transformer, in Flax linen.

One layer: RMSNorm -> GQA attention with RoPE (optionally reading/writing a KV cache) ->
residual, RMSNorm -> SwiGLU MLP -> residual. The stack of layers, the embedding and the heads
are pure functions over the parameter pytree in model/api.py and model/heads.py; this module
holds what has parameters with logical axis names (parallel/rules.py maps them onto the mesh).

Fine-tuning deltas are applied inside the layers, read from their own variable collections
next to "params" (model/lora.py, model/adapter.py build them; api.trunk passes them in):
    "lora":    per Dense kernel {"a": (*in, r), "b": (r, *out)}: y = x W + s ((x A) B)
    "adapter": per sublayer {"down", "up"}: a bottleneck on the attention / MLP output (serial)
               or beside the sublayer on its normed input (parallel)
A layer without those collections is the base model exactly.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm.config import ModelConfig
from jaxllm.model.attention import attention
from jaxllm.model.matmul import mixed_matmul
from jaxllm.model.quant import QuantizedKernel


def _dtype(name: str):
    return jnp.dtype(name)


def constrain(x, names):
    """Activation sharding hint; a no-op outside a mesh + logical-rules context."""
    return nn.with_logical_constraint(x, names)


def rms_norm(x, scale, eps: float):
    """RMSNorm in fp32 whatever the compute dtype; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), _dtype(self.param_dtype))
        return rms_norm(x, scale, self.eps)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies (head_dim/2,), with optional Llama-3.1 long-context scaling."""
    h = cfg.dim_per_head
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_scaling:
        factor, low, high, orig = cfg.rope_scaling
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = orig / low, orig / high
        smooth = (orig / wavelen - low) / (high - low)
        scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where((wavelen <= low_wl) & (wavelen >= high_wl), mid, scaled)
    return inv


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF Llama layout): pairs are (i, i + head_dim/2)."""
    angles = positions_bt[..., None].astype(jnp.float32) * inv_freq          # (B, T, H/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]     # (B, T, 1, H)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_btnh.dtype)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """How the "lora" collection is applied: y = x W + scale * ((dropout(x) A) B). Static (a
    pytree node without leaves), so it rides in the params pytree untrained and untraced."""
    scale: float
    dropout: float = 0.0            # on the LoRA input, only when trunk gets a dropout_rng


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AdapterOptions:
    """How the "adapter" collection is applied (config.AdapterConfig): y + scale*up(act(down(src))),
    src = the sublayer's output y ("serial") or its normed input ("parallel")."""
    activation: str = "gelu"
    placement: str = "serial"
    scale: float = 1.0


ADAPTER_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
                       "relu": jax.nn.relu, "silu": jax.nn.silu}


class NormalPool:
    """Standard-normal values for one layer's kernels, drawn as ONE flat vector and handed out in
    creation order. Why: every jax.random.normal is its own threefry + erf_inv fusion, and LLVM
    spends ~0.5 s on each on a CPU; the tiny model's init compiled in 6.8 s with one draw per kernel
    and in 1.5-1.9 s with one draw per layer (the values differ; their distribution does not)."""

    def __init__(self, key: jax.Array, size: int):
        self.flat = jax.random.normal(key, (size,), jnp.float32)
        self.offset = 0

    def take(self, shape) -> jax.Array:
        n = math.prod(shape)
        if self.offset + n > self.flat.shape[0]:
            raise ValueError(f"NormalPool of {self.flat.shape[0]} values cannot give {shape} at {self.offset}")
        out = jax.lax.slice(self.flat, (self.offset,), (self.offset + n,)).reshape(shape)
        self.offset += n
        return out


_NORMAL_POOL: contextvars.ContextVar[NormalPool | None] = contextvars.ContextVar("normal_pool", default=None)


@contextlib.contextmanager
def drawing_from(pool: NormalPool | None):
    """Context in which Dense kernels are initialised from `pool` (model/api.py's init_params)."""
    token = _NORMAL_POOL.set(pool)
    try:
        yield
    finally:
        _NORMAL_POOL.reset(token)


def kernel_init(std: float):
    """N(0, std^2), from the active NormalPool if any, else from the param's own key (Flax's)."""
    def init(key, shape, dtype=jnp.float32):
        pool = _NORMAL_POOL.get()
        z = pool.take(shape) if pool is not None else jax.random.normal(key, shape, jnp.float32)
        return (std * z).astype(dtype)
    return init


class Dense(nn.Module):
    """x (..., *in_dims) @ kernel (*in_dims, *out_dims) (+ bias). Our own rather than
    nn.DenseGeneral: Flax's version initialises a flattened kernel, which breaks logical
    sharding annotations of multi-dimensional kernels."""
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    names: tuple[str, ...]          # logical names of kernel axes (in_dims + out_dims)
    cfg: ModelConfig
    use_bias: bool = False
    init_std: float | None = None   # default: cfg.init_std
    lora: LoraOptions | None = None  # set when this layer may carry LoRA factors

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        std = cfg.init_std if self.init_std is None else self.init_std
        dt = _dtype(cfg.compute_dtype)
        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if isinstance(stored, QuantizedKernel):    # a QLoRA base (model/quant.py): dequantized per matmul
            if stored.shape != self.in_dims + self.out_dims:
                raise ValueError(f"quantized kernel of {'/'.join(self.scope.path)}: shape {stored.shape}, "
                                 f"this layer needs {self.in_dims + self.out_dims}")
            kernel = stored.dequantize(dt)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(
                kernel_init(std), self.names),
                self.in_dims + self.out_dims, _dtype(cfg.param_dtype))
        # bf16 operands accumulate in fp32, forward and backward (the fast path on CPUs and GPUs)
        y = mixed_matmul(x.astype(dt), kernel.astype(dt), len(self.in_dims), _dtype(cfg.dot_dtype), cfg.matmul)
        if self.lora is not None and self.has_variable("lora", "kernel"):
            y = y + self._lora_update(x, dt)
        # Named for the remat policies (model/api.py): mixed_matmul is a custom VJP, which
        # dot-matching policies do not see, so "save the projections" is said by name.
        y = checkpoint_name(y.astype(dt), "projection")
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.names[len(self.in_dims):]), self.out_dims, _dtype(cfg.param_dtype))
            y = y + bias.astype(dt)
        return y

    def _lora_update(self, x, dt):
        """s * ((x A) B) in fp32, through the rank-r bottleneck. Never x (W + s A B): autodiff
        would then build a full-size gradient for every adapted matrix."""
        factors = self.get_variable("lora", "kernel")
        a, b = factors["a"], factors["b"]
        r = a.shape[-1]
        if a.shape != self.in_dims + (r,) or b.shape != (r,) + self.out_dims:
            raise ValueError(f"LoRA factors of {'/'.join(self.scope.path)}/kernel: A {a.shape}, B {b.shape}; "
                             f"this kernel needs A {self.in_dims + (r,)}, B {(r,) + self.out_dims}")
        p = self.lora.dropout
        if p > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - p, x.shape)
            x = jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)
        out = _dtype(self.cfg.dot_dtype)
        k = self.cfg.matmul
        xa = mixed_matmul(x.astype(dt), a.astype(dt), len(self.in_dims), out, k).astype(dt)   # (..., r)
        return self.lora.scale * mixed_matmul(xa, b.astype(dt), 1, out, k).astype(jnp.float32)


def residual_init_std(cfg: ModelConfig) -> float:
    """GPT-2 / nanoGPT / Megatron: projections that write into the residual stream (attention
    output, MLP down) start at std / sqrt(2 * n_layers), so the residual's variance does not
    grow with depth at init."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scale_residual_init else cfg.init_std


class Attention(nn.Module):
    cfg: ModelConfig
    causal: bool = True
    lora: LoraOptions | None = None

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, cache=None, kv_segment_ids=None):
        """cache: None, or this layer's {"k", "v": (B, S, K, H), "index": ()} — the new keys
        and values are written at slots [index, index + T) and the queries read all S slots
        (kv_segment_ids (B, S): which slots hold real tokens of which segment)."""
        cfg = self.cfg
        d, h, n, k = cfg.d_model, cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads
        lo, bias = self.lora, cfg.qkv_bias
        q = Dense((d,), (n, h), ("embed", "heads", "head_dim"), cfg, bias, lora=lo, name="q")(x_btd)
        kk = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, bias, lora=lo, name="k")(x_btd)
        v = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, bias, lora=lo, name="v")(x_btd)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        inv = rope_frequencies(cfg)
        q, kk = apply_rope(q, positions_bt, inv), apply_rope(kk, positions_bt, inv)
        if cache is None:
            out_btnh = attention(q, kk, v, q_segment_ids=segment_ids_bt,
                                 kv_segment_ids=segment_ids_bt, causal=self.causal,
                                 implementation=cfg.attention, block=cfg.attention_block,
                                 dot_dtype=_dtype(cfg.dot_dtype), matmul=cfg.matmul)
            new_cache = None
        else:
            b, t = x_btd.shape[:2]
            idx = cache["index"]
            k_all = jax.lax.dynamic_update_slice(cache["k"], kk.astype(cache["k"].dtype), (0, idx, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, idx, 0, 0))
            s = k_all.shape[1]
            q_slots = jnp.broadcast_to(idx + jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            out_btnh = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                 q_positions=q_slots, kv_positions=kv_slots,
                                 q_segment_ids=segment_ids_bt, kv_segment_ids=kv_segment_ids,
                                 causal=self.causal, implementation=cfg.attention, block=cfg.attention_block,
                                 dot_dtype=_dtype(cfg.dot_dtype), matmul=cfg.matmul)
            new_cache = {"k": k_all, "v": v_all}
        out = Dense((n, h), (d,), ("heads", "head_dim", "embed"), cfg,
                    init_std=residual_init_std(cfg), lora=lo, name="o")(out_btnh)
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    lora: LoraOptions | None = None

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.cfg
        d, f = cfg.d_model, cfg.d_ff
        gate = Dense((d,), (f,), ("embed", "mlp"), cfg, lora=self.lora, name="gate")(x_btd)
        up = Dense((d,), (f,), ("embed", "mlp"), cfg, lora=self.lora, name="up")(x_btd)
        hidden = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((f,), (d,), ("mlp", "embed"), cfg, init_std=residual_init_std(cfg),
                     lora=self.lora, name="down")(hidden)


class Block(nn.Module):
    """One pre-norm decoder layer: (x, positions, segments, cache) -> (x, new cache)."""
    cfg: ModelConfig
    causal: bool = True
    lora: LoraOptions | None = None
    adapter: AdapterOptions | None = None

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, cache=None, kv_segment_ids=None):
        cfg = self.cfg
        x_btd = constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
        h = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="attn_norm")(x_btd)
        a, new_cache = Attention(cfg, self.causal, self.lora, name="attn")(
            h, positions_bt, segment_ids_bt, cache, kv_segment_ids)
        x_btd = x_btd + self._adapted("after_attn", a, h)
        h = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="mlp_norm")(x_btd)
        x_btd = x_btd + self._adapted("after_mlp", MLP(cfg, self.lora, name="mlp")(h), h)
        return x_btd, new_cache

    def _adapted(self, name: str, y_btd, h_btd):
        """A sublayer's output y (from normed input h) plus its bottleneck adapter, before the
        residual add: y + s*up(act(down(src))), src = y (serial, Houlsby) or h (parallel, He et
        al.). Up starts at zero, so a fresh adapter returns y exactly."""
        if self.adapter is None or not self.has_variable("adapter", name):
            return y_btd
        p = self.get_variable("adapter", name)
        dt = _dtype(self.cfg.compute_dtype)
        src = h_btd if self.adapter.placement == "parallel" else y_btd
        out = _dtype(self.cfg.dot_dtype)
        k = self.cfg.matmul
        z = mixed_matmul(src.astype(dt), p["down"]["kernel"].astype(dt), 1, out, k) + p["down"]["bias"]
        z = ADAPTER_ACTIVATIONS[self.adapter.activation](z).astype(dt)             # (B, T, size)
        u = mixed_matmul(z, p["up"]["kernel"].astype(dt), 1, out, k) + p["up"]["bias"]  # (B, T, d) fp32
        return (y_btd.astype(jnp.float32) + self.adapter.scale * u).astype(y_btd.dtype)
