"""Decoder-only Llama-family transformer in Flax linen.

Embedding -> n_layers x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] (stacked with nn.scan) -> RMSNorm -> LM head.
Every parameter carries logical axis names; parallel/rules.py maps them onto the mesh.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.model.attention import attention
from jaxllm.model.matmul import mixed_matmul

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _dtype(name: str):
    return jnp.dtype(name)


def constrain(x, names):
    """Activation sharding hint; a no-op outside a mesh + logical-rules context."""
    return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), _dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


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


class Dense(nn.Module):
    """x (..., *in_dims) @ kernel (*in_dims, *out_dims) (+ bias). Our own rather than
    nn.DenseGeneral: Flax's version initialises a flattened kernel, which breaks logical
    sharding annotations of multi-dimensional kernels."""
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    names: tuple[str, ...]          # logical names of kernel axes (in_dims + out_dims)
    cfg: ModelConfig
    use_bias: bool = False
    out_dtype: str | None = None    # default: the compute dtype

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), self.names),
            self.in_dims + self.out_dims, _dtype(cfg.param_dtype))
        dt = _dtype(cfg.compute_dtype)
        # bf16 operands accumulate in fp32, forward and backward (the fast path on CPUs and GPUs)
        y = mixed_matmul(x.astype(dt), kernel.astype(dt), len(self.in_dims))
        y = y.astype(self.out_dtype or dt)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.names[len(self.in_dims):]), self.out_dims, _dtype(cfg.param_dtype))
            y = y + bias.astype(dt)
        return y


class Attention(nn.Module):
    cfg: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt):
        cfg = self.cfg
        d, h, n, k = cfg.d_model, cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads
        q = Dense((d,), (n, h), ("embed", "heads", "head_dim"), cfg, cfg.qkv_bias, name="q")(x_btd)
        kk = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, cfg.qkv_bias, name="k")(x_btd)
        v = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, cfg.qkv_bias, name="v")(x_btd)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        inv = rope_frequencies(cfg)
        q, kk = apply_rope(q, positions_bt, inv), apply_rope(kk, positions_bt, inv)
        out_btnh = attention(q, kk, v, segment_ids_bt=segment_ids_bt, causal=self.causal,
                             implementation=cfg.attention)
        return Dense((n, h), (d,), ("heads", "head_dim", "embed"), cfg, name="o")(out_btnh)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.cfg
        d, f = cfg.d_model, cfg.d_ff
        gate = Dense((d,), (f,), ("embed", "mlp"), cfg, name="gate")(x_btd)
        up = Dense((d,), (f,), ("embed", "mlp"), cfg, name="up")(x_btd)
        hidden = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((f,), (d,), ("mlp", "embed"), cfg, name="down")(hidden)


class Block(nn.Module):
    """One pre-norm decoder layer. Signature fits nn.scan: (carry, broadcast...) -> (carry, None)."""
    cfg: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt):
        cfg = self.cfg
        x_btd = constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
        h = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="attn_norm")(x_btd)
        x_btd = x_btd + Attention(cfg, self.causal, name="attn")(h, positions_bt, segment_ids_bt)
        h = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="mlp_norm")(x_btd)
        x_btd = x_btd + MLP(cfg, name="mlp")(h)
        return x_btd, None


class Transformer(nn.Module):
    cfg: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, tokens_bt, positions_bt, segment_ids_bt, return_hidden: bool = False):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=_dtype(cfg.compute_dtype),
                         param_dtype=_dtype(cfg.param_dtype), name="embed",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(cfg.init_std), ("vocab", "embed")))
        x_btd = embed(tokens_bt)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x_btd, _ = layers(cfg, self.causal, name="layers")(x_btd, positions_bt, segment_ids_bt)
        x_btd = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x_btd)
        if return_hidden:
            return x_btd
        # Logits stay fp32 even under bf16 compute: bf16 rounding of logits over a large
        # vocabulary would add ~0.1 of noise to the cross-entropy.
        if cfg.tie_embeddings:
            table = embed.embedding.astype(_dtype(cfg.compute_dtype))
            logits = jnp.einsum("btd,vd->btv", x_btd, table, preferred_element_type=jnp.float32)
        else:
            logits = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg,
                           out_dtype="float32", name="lm_head")(x_btd)
        logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32)
