"""Pure functions over plain parameter pytrees: what research code imports.

    params = init_params(model_cfg, jax.random.key(0))
    hidden_btd, cache = trunk(params, tokens_bt, model_cfg)          # one pass feeds every head
    logits_btv = unembed(params, hidden_btd, model_cfg)              # (B, T, vocab) float32
    logits_btv = forward(params, tokens_bt, model_cfg)               # both, for convenience

The parameter tree (HF names in interop/hf.py):
    embed/embedding (vocab, d)   layers/... stacked on a leading n_layers axis
    final_norm/scale (d,)        lm_head/kernel (d, vocab)  (absent with tied embeddings)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.config import ModelConfig
from jaxllm.model.matmul import mixed_matmul
from jaxllm.model.tokens import patch_embeddings, patch_logits
from jaxllm.model.transformer import Block, NormalPool, constrain, drawing_from, rms_norm

_policies = jax.checkpoint_policies
# What the backward pass keeps of each layer's forward; the rest is recomputed. The Dense
# projections are custom VJPs (model/matmul.py), invisible to dot-matching policies, so they
# are matched by their checkpoint name "projection" (model/transformer.py).
REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    # every matmul output: projections and the attention einsums (scores, probs @ v; named
    # "attention_dot" under model.matmul=blas, whose custom VJPs checkpoint_dots does not see)
    "dots": _policies.save_from_both_policies(
        _policies.checkpoint_dots, _policies.save_only_these_names("projection", "attention_dot")),
    # the projections only; attention is recomputed (its (B, heads, T, S) scores are not kept)
    "dots_no_batch": _policies.save_from_both_policies(
        _policies.checkpoint_dots_with_no_batch_dims, _policies.save_only_these_names("projection")),
    # what dots_no_batch keeps, moved to host memory (pinned_host) until the backward needs it;
    # on CPU host and device memory are one RAM, so there it neither costs nor saves anything
    "offload": _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["projection"],
        offload_src="device", offload_dst="pinned_host"),
}


def positions_from_segments(segment_ids_bt: jax.Array) -> jax.Array:
    """Per-document positions: 0 at each segment start, counting up inside the segment."""
    t = segment_ids_bt.shape[1]
    idx = jnp.arange(t)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids_bt[:, :1], bool),
                              segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(jnp.int32)


def _inputs(tokens_bt, positions, segment_ids):
    tokens_bt = jnp.asarray(tokens_bt)
    if tokens_bt.ndim != 2:
        raise ValueError(f"tokens must be (batch, time), got shape {tokens_bt.shape}")
    if positions is None:
        if segment_ids is not None:
            positions = positions_from_segments(jnp.asarray(segment_ids))
        else:
            positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
    return tokens_bt, jnp.asarray(positions), None if segment_ids is None else jnp.asarray(segment_ids)


# ---------------------------------------------------------------------------- parameters
def _layer_init(cfg: ModelConfig, key, causal: bool = True):
    """One layer's boxed params (Flax `Partitioned` leaves carrying logical names)."""
    x = jnp.zeros((1, 2, cfg.d_model), jnp.dtype(cfg.compute_dtype))
    pos = jnp.zeros((1, 2), jnp.int32)
    # Empty logical rules: no sharding constraints inside init; callers place the result
    # with jit out_shardings instead.
    with nn.logical_axis_rules(()):
        return Block(cfg, causal).init(key, x, pos, None)["params"]


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """A plain pytree of arrays (no Flax boxes). Layers are stacked on a leading axis, each
    initialised from its own key, so the values do not depend on jit, eager or sharding. Each
    layer's kernels come from one flat normal draw, and so do embedding + LM head (NormalPool:
    one draw per kernel made init the slowest compile of a small run)."""
    k_embed, k_layers = jax.random.split(key, 2)
    pdt = jnp.dtype(cfg.param_dtype)
    # Every layer has the same parameter count; the pool holds that many values (norm scales
    # take none, so its tail goes unused).
    layer_size = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: _layer_init(cfg, jax.random.key(0)))))

    def layer(k):
        k_pool, k_rest = jax.random.split(k)
        with nn.logical_axis_rules(()), drawing_from(NormalPool(k_pool, layer_size)):
            return nn.meta.unbox(_layer_init(cfg, k_rest))
    v, d = cfg.vocab_size, cfg.d_model
    table = NormalPool(k_embed, v * d * (1 if cfg.tie_embeddings else 2))
    params = {
        "embed": {"embedding": (cfg.init_std * table.take((v, d))).astype(pdt)},
        "layers": jax.vmap(layer)(jax.random.split(k_layers, cfg.n_layers)),
        "final_norm": {"scale": jnp.ones((d,), pdt)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": (cfg.init_std * table.take((d, v))).astype(pdt)}
    return params


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Pytree (same structure as params) of PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(lambda: _layer_init(cfg, jax.random.key(0)))
    layer_specs = nn.get_partition_spec(boxed)
    specs = {
        "embed": {"embedding": P("vocab", "embed")},
        "layers": jax.tree.map(lambda s: P("layers", *s), layer_specs,
                               is_leaf=lambda x: isinstance(x, P)),
        "final_norm": {"scale": P("norm")},
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = {"kernel": P("embed", "vocab")}
    return specs


def param_shapes(cfg: ModelConfig) -> dict:
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------- KV cache
def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache: k/v (n_layers, B, max_len, kv_heads, head_dim) in the compute dtype,
    the segment id of each slot (0 = empty or padding) and the next slot to write."""
    dt = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


# ---------------------------------------------------------------------------- the trunk
def _eager() -> bool:
    return bool(jax.config.jax_disable_jit)


def trunk(params: dict, tokens_bt, cfg: ModelConfig, *, positions=None, segment_ids=None,
          causal: bool = True, cache: dict | None = None, dropout_rng: jax.Array | None = None):
    """Final-norm hidden states (B, T, d_model) in the compute dtype, and the updated cache.

    segment_ids: attention never crosses segments (0 = padding); positions drive RoPE
    (default: per-segment positions, else 0..T-1). With a cache (init_cache), the T tokens
    are written at slots [index, index + T) and attend to every filled slot before them;
    their segment id defaults to 1 (pass 0 for left padding of a prompt).
    Under jax.disable_jit (debug mode) the layers run as a Python loop without remat, so a
    debugger sees concrete arrays inside every layer; model.scan_layers=false unrolls them
    under jit too.
    Fine-tuning deltas ride in params (model/lora.py, model/adapter.py `attach`): params["lora"]
    and params["adapter"] hold {"layers": factors stacked on layers, "options": static}; each
    layer reads its slice as a variable collection. dropout_rng: training-time LoRA dropout
    (none without it).
    """
    tokens_bt, positions, segment_ids = _inputs(tokens_bt, positions, segment_ids)
    dt = jnp.dtype(cfg.compute_dtype)
    x_btd = jnp.take(params["embed"]["embedding"].astype(dt), tokens_bt, axis=0)
    if "tokens" in params:          # trainable token rows beside a delta (model/tokens.py)
        x_btd = patch_embeddings(x_btd, tokens_bt, params["tokens"])
    x_btd = constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))

    kv_seg, index, layer_caches = None, None, None
    if cache is not None:
        index = cache["index"]
        q_seg = jnp.ones_like(tokens_bt, jnp.int32) if segment_ids is None else segment_ids
        kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], q_seg.astype(jnp.int32), (0, index))
        segment_ids = q_seg
        layer_caches = {"k": cache["k"], "v": cache["v"]}
    block = Block(cfg, causal, lora=params["lora"]["options"] if "lora" in params else None,
                  adapter=params["adapter"]["options"] if "adapter" in params else None)
    # per-layer variable collections besides "params", stacked on layers like params["layers"]
    deltas = {name: params[name]["layers"] for name in ("lora", "adapter") if name in params}
    layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.n_layers)

    def layer(x, xs):
        p, c, d, rng = xs
        if c is not None:
            c = dict(c, index=index)
        return block.apply({"params": p, **d}, x, positions, segment_ids, c, kv_seg,
                           rngs=None if rng is None else {"dropout": rng})

    xs = (params["layers"], layer_caches, deltas, layer_rngs)
    if cfg.remat != "none" and not _eager():
        # prevent_cse=False is safe only under scan (JAX's docs). Unrolled on CPU, remat saves
        # almost nothing either way (measured; training/loop.py says so in one line)
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if _eager() or not cfg.scan_layers:
        # a Python loop over the stacked layers: eager debugging, or model.scan_layers=false
        # Split each stacked leaf once: the gradient of a split is one concatenate, while taking
        # a[i] per layer gives each layer's gradient padded to the whole stack and summed (the
        # 25m step's profile showed (6, 1408, 512) pad+add fusions per matrix).
        leaves, treedef = jax.tree.flatten(xs)
        pieces = [jnp.split(a, cfg.n_layers) for a in leaves]
        new = []
        for i in range(cfg.n_layers):
            x_btd, c = layer(x_btd, jax.tree.unflatten(treedef, [jnp.squeeze(p[i], 0) for p in pieces]))
            new.append(c)
        new_caches = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
    else:
        x_btd, new_caches = jax.lax.scan(layer, x_btd, xs)
    x_btd = rms_norm(x_btd, params["final_norm"]["scale"], cfg.norm_eps)
    new_cache = None
    if cache is not None:
        new_cache = {"k": new_caches["k"], "v": new_caches["v"], "segment_ids": kv_seg,
                     "index": index + tokens_bt.shape[1]}
    return x_btd, new_cache


# ---------------------------------------------------------------------------- the LM head
def unembed_matrix(params: dict, cfg: ModelConfig) -> jax.Array:
    """(d_model, vocab) in the compute dtype: lm_head, or the embedding when tied."""
    dt = jnp.dtype(cfg.compute_dtype)
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].astype(dt).T
    return params["lm_head"]["kernel"].astype(dt)


def unembed(params: dict, hidden_btd: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits (..., vocab) in float32 even under bf16 compute: bf16 rounding of logits over a
    large vocabulary would add ~0.1 of noise to the cross-entropy. (model.dot_output=compute
    opts into that rounding, as torch autocast does; they are still returned as float32.)"""
    w_dv = unembed_matrix(params, cfg)
    logits = mixed_matmul(hidden_btd.astype(w_dv.dtype), w_dv, 1,
                          jnp.dtype(cfg.dot_dtype), cfg.matmul).astype(jnp.float32)
    if "tokens" in params:
        logits = patch_logits(logits, hidden_btd, params["tokens"])
    if logits.ndim == 3:
        logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits


def forward(params: dict, tokens_bt, cfg: ModelConfig, positions=None, segment_ids=None,
            causal: bool = True) -> jax.Array:
    """Logits (B, T, vocab) in float32: trunk then unembed. Training losses use
    model.heads.token_stats instead, which never holds the whole logits tensor."""
    hidden_btd, _ = trunk(params, tokens_bt, cfg, positions=positions, segment_ids=segment_ids,
                          causal=causal)
    return unembed(params, hidden_btd, cfg)
