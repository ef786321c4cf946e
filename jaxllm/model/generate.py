"""Autoregressive decoding with a KV cache: the rollout engine of PPO/GRPO, evaluation and chat.

    out = generate(params, [[2, 17, 9], [2, 5]], cfg, max_new_tokens=64, key=key,
                   temperature=0.7, top_p=0.9, eos_id=3, pad_id=0)
    out.tokens, out.logprobs, out.mask          # each (B, max_new_tokens)

It is the training model, not a second transformer: one `trunk` pass over the prompts fills a
preallocated cache (api.init_cache: k/v (layers, B, P + N, kv_heads, head_dim) in the compute
dtype, GQA heads never repeated), then a jitted `lax.while_loop` feeds one token per step
through the same `trunk`, reading the cache. LoRA/adapter deltas inside `params` are applied
by the trunk like in training.

Prompts of different lengths share a batch by LEFT padding: row b's tokens are right-aligned in
a (B, P) array, padding has segment id 0 (attention never reads it: a real token only sees
segment 1), and RoPE positions count real tokens only (0 at a row's first real token), so a
row's continuation does not depend on how much padding the batch gave it. The cache slots
(P + N of them) are the causal order; the RoPE positions are separate (see model/attention.py).

Per row, generation stops after eos_id or any of stop_ids (that token is kept and counted in
the mask), or after max_new_tokens. `mask` is 1 for every real generated token (up to and
including the stop token) and 0 after; tokens after a stop are pad_id with log-prob 0.

Log-probs are those of the sampling distribution's temperature over the FULL vocabulary:
log_softmax(logits / T) at the sampled token (T = 1 for greedy). top-k / top-p choose which
tokens may be sampled but do not renormalise the reported log-prob, so it equals what a
training step recomputes with heads.token_stats(..., temperature=T) for the PPO ratio.

A model whose vocabulary is padded past its tokenizer's (a multiple of 128 is usual) can
sample ids that are no token; `vocab_limit` restricts sampling to ids below it (generate_text
passes the tokenizer's size), and the log-probs are then those of that restricted distribution.

Sampling is deterministic: step i draws with fold_in(key, i), so a fixed key gives the same
samples under jit, on any mesh, and through `stream` (host-driven, one token at a time).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import UserError
from jaxllm.model.api import init_cache, trunk, unembed


class GenerationError(UserError):
    """A request generation cannot serve (empty prompt, too long, bad sampling setting)."""


class Generation(NamedTuple):
    tokens: jax.Array         # (B, N) int32: sampled ids; pad_id after a row stopped
    logprobs: jax.Array       # (B, N) float32: log_softmax(logits / T) at each token; 0 after stop
    mask: jax.Array           # (B, N) int32: 1 up to and including the stop token, 0 after
    prompt_tokens: jax.Array  # (B, P) int32: the left-padded prompts the tokens continue
    prompt_mask: jax.Array    # (B, P) int32: 1 on real prompt tokens


# ---------------------------------------------------------------------------- prompts
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> (tokens (B, P), mask (B, P)) int32, each row right-aligned; P is the
    longest prompt rounded up to `multiple`. More left padding changes no result (padding is
    never attended and RoPE counts real tokens), and bucketed widths let a caller that decodes
    many batches reuse a few compiled programs instead of compiling one per distinct width."""
    if len(prompts) == 0:
        raise GenerationError("generate: no prompts given (an empty batch)")
    if int(multiple) != multiple or multiple < 1:
        raise GenerationError(f"left_pad: multiple must be a positive integer, got {multiple}")
    lengths = [len(p) for p in prompts]
    for b, n in enumerate(lengths):
        if n == 0:
            raise GenerationError(f"generate: prompt {b} is empty; a model needs at least one token "
                                  f"to continue (encode the text with add_bos=True, or give a bos id)")
    width = -(-max(lengths) // multiple) * multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = np.asarray(p, np.int64)
        mask[b, width - len(p):] = 1
    return tokens, mask


def _values_unseen(*xs) -> bool:
    """Traced (inside a caller's jit), or a multi-host global array, of which this process holds
    only its rows: values are not checked on the host (a check that failed on one process only
    would leave the others waiting in the next collective)."""
    return any(isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable)
               for x in xs)


def _check_request(tokens_bp, mask_bp, cfg: ModelConfig, max_new_tokens: int, *,
                   temperature: float, top_k: int, top_p: float, ids: dict) -> None:
    """Every argument error as one GenerationError naming the argument and what is valid. Checks
    of values are skipped for traced prompts (inside a caller's jit) and multi-host global
    arrays; shapes are still checked."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens <= 0:
        raise GenerationError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens}")
    if not temperature >= 0:
        raise GenerationError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0 or top_k > cfg.vocab_size:
        raise GenerationError(f"generate: top_k must be in [0, vocab_size={cfg.vocab_size}] "
                              f"(0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"generate: top_p must be in (0, 1] (1 = off), got {top_p}")
    for name, i in ids.items():
        if i is not None and not 0 <= i < cfg.vocab_size:
            raise GenerationError(f"generate: {name}={i} is not a token id of this model "
                                  f"(vocab_size {cfg.vocab_size})")
    if tokens_bp.ndim != 2 or tokens_bp.shape != mask_bp.shape or tokens_bp.shape[0] == 0:
        raise GenerationError(f"generate: prompts must be (batch, length) with a mask of the same "
                              f"shape, got {tokens_bp.shape} and {mask_bp.shape}")
    p = tokens_bp.shape[1]
    if _values_unseen(tokens_bp, mask_bp):
        longest, where = p, f"the padded prompt width {p}"
    else:
        tokens, mask = np.asarray(tokens_bp), np.asarray(mask_bp) != 0
        lengths = mask.sum(1)
        if (lengths == 0).any():
            b = int(np.argmax(lengths == 0))
            raise GenerationError(f"generate: prompt {b} is empty (its prompt_mask row is all 0); a model "
                                  f"needs at least one token to continue")
        if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
            b = int(np.argmax((np.diff(mask.astype(np.int8), axis=1) < 0).any(1)))
            raise GenerationError(f"generate: prompt {b} is not left-padded (its prompt_mask has a 0 after "
                                  f"a 1); padding must come before the prompt (see jaxllm.model.generate.left_pad)")
        bad = mask & ((tokens < 0) | (tokens >= cfg.vocab_size))
        if bad.any():
            b, t = map(int, np.argwhere(bad)[0])
            raise GenerationError(f"generate: prompt {b} holds token id {tokens[b, t]} outside the "
                                  f"model's vocabulary [0, {cfg.vocab_size})")
        b = int(np.argmax(lengths))
        longest, where = int(lengths[b]), f"prompt {b} ({int(lengths[b])} tokens)"
    if longest + max_new_tokens > cfg.max_seq_len:
        room = cfg.max_seq_len - max_new_tokens
        fix = (f"shorten the prompt to its last {room} tokens or lower max_new_tokens" if room > 0 else
               f"lower max_new_tokens below {cfg.max_seq_len}")
        raise GenerationError(
            f"generate: {where} + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} tokens "
            f"exceeds the model's max_seq_len={cfg.max_seq_len}; {fix}")


# ---------------------------------------------------------------------------- sampling
def sample_logits(logits_bv: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, vocab_limit: int = 0) -> tuple[jax.Array, jax.Array]:
    """One token per row -> (tokens (B,) int32, log-probs (B,) float32).

    temperature 0: argmax, log-prob under T = 1. Otherwise a draw from softmax(logits / T)
    restricted to the k most likely tokens (top_k > 0) and then to the smallest set of them
    whose probability (renormalised over that set, as in transformers) reaches top_p. The
    log-prob is log_softmax(logits / T) over the whole vocabulary (see the module docstring).
    vocab_limit > 0: ids from vocab_limit on are never drawn (nor counted in the log-probs).
    """
    logits_bv = logits_bv.astype(jnp.float32)
    if vocab_limit and vocab_limit < logits_bv.shape[-1]:
        logits_bv = jnp.where(jnp.arange(logits_bv.shape[-1]) < vocab_limit, logits_bv, -jnp.inf)
    if temperature == 0:
        token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        scaled_bv = logits_bv
    else:
        scaled_bv = logits_bv / temperature
        if top_k or top_p < 1:
            # sorted candidates (all of the vocabulary when only top_p is set)
            vals_bk, idx_bk = jax.lax.top_k(scaled_bv, top_k or scaled_bv.shape[-1])
            if top_p < 1:
                probs_bk = jax.nn.softmax(vals_bk, axis=-1)
                before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk   # mass of the better tokens
                vals_bk = jnp.where(before_bk < top_p, vals_bk, -jnp.inf)  # the first always stays
            choice_b = jax.random.categorical(key, vals_bk, axis=-1)
            token_b = jnp.take_along_axis(idx_bk, choice_b[:, None], axis=-1)[:, 0].astype(jnp.int32)
        else:
            token_b = jax.random.categorical(key, scaled_bv, axis=-1).astype(jnp.int32)
    logprob_b = jnp.take_along_axis(jax.nn.log_softmax(scaled_bv, axis=-1), token_b[:, None], axis=-1)[:, 0]
    return token_b, logprob_b


# ---------------------------------------------------------------------------- model steps
def _compute_params(params: dict, cfg: ModelConfig) -> dict:
    """Matrices cast to the compute dtype once, outside the decode loop. The layers cast every
    kernel, bias and the embedding to the compute dtype at each call; in a loop of N steps that
    would re-read the float32 weights N times. The result is bit-identical (a cast of a cast).
    Norm scales stay as they are (rms_norm reads them in float32), and so do LoRA/adapter/token-row
    subtrees, which the layers apply in their own way."""
    dt = jnp.dtype(cfg.compute_dtype)

    def cast(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if (dt != x.dtype and jnp.issubdtype(x.dtype, jnp.floating) and keys[-1] in ("kernel", "bias", "embedding")
                and not {"lora", "adapter", "tokens"} & set(keys)):
            return x.astype(dt)
        return x
    return jax.tree_util.tree_map_with_path(cast, params)


def prefill(params: dict, tokens_bp: jax.Array, prompt_mask_bp: jax.Array, cfg: ModelConfig,
            max_len: int) -> tuple[jax.Array, dict, jax.Array]:
    """One trunk pass over left-padded prompts into a fresh cache of max_len slots.
    -> (logits of the next token (B, V) float32, cache, RoPE position of the next token (B,))."""
    mask_bp = prompt_mask_bp.astype(jnp.int32)
    positions_bp = jnp.maximum(jnp.cumsum(mask_bp, axis=1) - 1, 0)
    cache = init_cache(cfg, tokens_bp.shape[0], max_len)
    hidden_bpd, cache = trunk(params, tokens_bp, cfg, positions=positions_bp, segment_ids=mask_bp,
                              cache=cache)
    # left padding: the last column is every row's last real token
    return unembed(params, hidden_bpd[:, -1], cfg), cache, jnp.sum(mask_bp, axis=1)


def decode_step(params: dict, tokens_b: jax.Array, positions_b: jax.Array, cache: dict,
                cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """Feed one token per row at RoPE position positions_b -> (next-token logits (B, V), cache)."""
    hidden_b1d, cache = trunk(params, tokens_b[:, None], cfg, positions=positions_b[:, None],
                              segment_ids=jnp.ones_like(tokens_b[:, None]), cache=cache)
    return unembed(params, hidden_b1d[:, 0], cfg), cache


def _decode(params, tokens_bp, mask_bp, key, cfg: ModelConfig, max_new_tokens: int, temperature: float,
            top_k: int, top_p: float, stop_ids: tuple[int, ...], pad_id: int, vocab_limit: int) -> Generation:
    b, n = tokens_bp.shape[0], max_new_tokens
    params = _compute_params(params, cfg)
    logits_bv, cache, next_pos_b = prefill(params, tokens_bp, mask_bp, cfg, tokens_bp.shape[1] + n)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    def sample(logits, i):
        return sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature,
                             top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    tok_b, lp_b = sample(logits_bv, 0)
    tokens_bn = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok_b)
    logprobs_bn = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp_b)
    mask_bn = jnp.zeros((b, n), jnp.int32).at[:, 0].set(1)
    done_b = jnp.isin(tok_b, stops)

    def cond(carry):
        i, *_, done_b = carry
        return (i < n) & ~jnp.all(done_b)

    def body(carry):
        i, cache, prev_b, tokens_bn, logprobs_bn, mask_bn, done_b = carry
        logits_bv, cache = decode_step(params, prev_b, next_pos_b + i - 1, cache, cfg)
        tok_b, lp_b = sample(logits_bv, i)
        live_b = ~done_b
        tok_b = jnp.where(live_b, tok_b, pad_id)
        tokens_bn = tokens_bn.at[:, i].set(tok_b)
        logprobs_bn = logprobs_bn.at[:, i].set(jnp.where(live_b, lp_b, 0.0))
        mask_bn = mask_bn.at[:, i].set(live_b.astype(jnp.int32))
        return i + 1, cache, tok_b, tokens_bn, logprobs_bn, mask_bn, done_b | jnp.isin(tok_b, stops)

    carry = (jnp.int32(1), cache, tok_b, tokens_bn, logprobs_bn, mask_bn, done_b)
    _, _, _, tokens_bn, logprobs_bn, mask_bn, _ = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens_bn, logprobs_bn, mask_bn, tokens_bp, mask_bp)


_decode_jit = jax.jit(_decode, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                                "stop_ids", "pad_id", "vocab_limit"))


def _prompt_arrays(prompts, prompt_mask, pad_id: int):
    if isinstance(prompts, (list, tuple)) and (len(prompts) == 0 or not np.isscalar(prompts[0])):
        if prompt_mask is not None:
            raise GenerationError("generate: prompt_mask applies to a (batch, length) array of prompts, "
                                  "not to a list of token lists (which is left-padded here)")
        return left_pad(prompts, pad_id)
    tokens_bp = prompts if _values_unseen(prompts) else np.asarray(prompts, np.int32)
    if prompt_mask is None:
        prompt_mask = jnp.ones(tokens_bp.shape, jnp.int32)
    return tokens_bp, prompt_mask


def generate(params: dict, prompts, model_cfg: ModelConfig, *, max_new_tokens: int, key: jax.Array,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None,
             pad_id: int, stop_ids: Sequence[int] = (), prompt_mask=None, vocab_limit: int = 0) -> Generation:
    """Continue each prompt by up to max_new_tokens tokens (see the module docstring).

    prompts: a list of token-id lists (left-padded here), or a (B, P) int array that is
    already left-padded with `prompt_mask` (B, P) marking its real tokens (None: no padding).
    eos_id None: only stop_ids and max_new_tokens end a row. vocab_limit: see the module
    docstring (0: every id of the model). Pure: callers may jit it with the
    sampling settings, ids and max_new_tokens static (arrays in, a Generation of arrays out).
    """
    tokens_bp, mask_bp = _prompt_arrays(prompts, prompt_mask, pad_id)
    _check_request(tokens_bp, mask_bp, model_cfg, max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, ids={"eos_id": eos_id, "pad_id": pad_id,
                                     **{f"stop_ids[{i}]": s for i, s in enumerate(stop_ids)}})
    stops = tuple(sorted({int(s) for s in stop_ids} | ({int(eos_id)} if eos_id is not None else set())))
    return _decode_jit(params, jnp.asarray(tokens_bp, jnp.int32), jnp.asarray(mask_bp, jnp.int32), key,
                       model_cfg, int(max_new_tokens), float(temperature), int(top_k), float(top_p), stops,
                       int(pad_id), int(vocab_limit))


# ---------------------------------------------------------------------------- host-driven
_prefill_jit = jax.jit(prefill, static_argnames=("cfg", "max_len"))
_step_jit = jax.jit(decode_step, static_argnames=("cfg",), donate_argnames=("cache",))
_sample_jit = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p", "vocab_limit"))
_cast_jit = jax.jit(_compute_params, static_argnames=("cfg",))


def stream(params: dict, prompt: Sequence[int], model_cfg: ModelConfig, *, max_new_tokens: int,
           key: jax.Array, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int | None, stop_ids: Sequence[int] = (), vocab_limit: int = 0) -> Iterator[int]:
    """One prompt, decoded step by step from the host: yields each token id as it is produced
    (the stop token included, then ends). Same steps and keys as `generate`, so the same tokens;
    for interactive use (chat), where the first words should appear before the last is made."""
    # widths in steps of 64: a chat's growing prompts reuse a few compiled shapes
    tokens_bp, mask_bp = left_pad([list(prompt)], 0, multiple=64)
    _check_request(tokens_bp, mask_bp, model_cfg, max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, ids={"eos_id": eos_id, **{f"stop_ids[{i}]": s for i, s in enumerate(stop_ids)}})
    stops = {int(s) for s in stop_ids} | ({int(eos_id)} if eos_id is not None else set())
    params = _cast_jit(params, model_cfg)
    settings = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                    vocab_limit=int(vocab_limit))
    logits, cache, pos = _prefill_jit(params, jnp.asarray(tokens_bp), jnp.asarray(mask_bp), model_cfg,
                                      tokens_bp.shape[1] + max_new_tokens)
    for i in range(max_new_tokens):
        tok_b, _ = _sample_jit(logits, jax.random.fold_in(key, i), **settings)
        token = int(tok_b[0])
        yield token
        if token in stops:
            return
        if i + 1 < max_new_tokens:     # token i goes in at RoPE position pos + i
            logits, cache = _step_jit(params, tok_b, pos + i, cache, model_cfg)


def generate_text(params: dict, model_cfg: ModelConfig, tokenizer, texts: Sequence[str], *,
                  max_new_tokens: int, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, stop_ids: Sequence[int] = (), add_bos: bool | None = None) -> list[str]:
    """Texts in, completions out: encode (with bos when the tokenizer has one, unless add_bos
    says otherwise), generate (ids the tokenizer lacks are never sampled), decode each row's
    tokens before its stop token."""
    if isinstance(texts, str):
        raise GenerationError("generate_text: texts must be a list of strings, got one string")
    bos = tokenizer.bos_id is not None if add_bos is None else add_bos
    prompts = [tokenizer.encode(t, add_bos=bos) for t in texts]
    out = generate(params, prompts, model_cfg, max_new_tokens=max_new_tokens, key=key,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, stop_ids=stop_ids, vocab_limit=tokenizer.vocab_size)
    return decode_rows(tokenizer, out, stop_ids)


def decode_rows(tokenizer, out: Generation, stop_ids: Sequence[int] = ()) -> list[str]:
    """Each row's real generated tokens as text, without the token that stopped it."""
    stops = set(stop_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    texts = []
    for row, m in zip(tokens, mask):
        ids = row[m != 0].tolist()
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts
