"""Trainable token rows beside a LoRA or adapter delta (PEFT's `trainable_token_indices`).

Why: a chat template's special tokens (`<|im_start|>`, `<|im_end|>`) are reserved in the
tokenizer but never seen in pretraining, so their embedding and LM-head rows are still at
their random init. A delta over the layers alone cannot move them: the model barely reads
those tokens and cannot learn to emit end-of-turn with confidence. Training just those rows
(n x d_model each) fixes that at a negligible parameter cost.

The rows are additive and start at zero, so the adapted model starts as the base exactly:
    delta["tokens"] = {"embed": (n, d), "unembed": (n, d)}   # no "unembed" when tied
    embedding row of ids[i]  = E[ids[i]] + embed[i]
    LM-head column of ids[i] = W[:, ids[i]] + unembed[i]     (tied: + embed[i])
Neither the (vocab, d) table nor the LM head is copied or differentiated: the input rows are
patched after the lookup and the n logit columns after the head's matmul.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm.configlib import ConfigError


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TokenOptions:
    """Which token ids the "tokens" rows belong to (static: no leaves, never traced)."""
    ids: tuple[int, ...]
    tied: bool


def resolve(spec, tokenizer, field: str) -> tuple[int, ...]:
    """Token ids from a config list of ids and/or pieces (e.g. ["<|im_start|>", "<|im_end|>"]):
    a piece is a special token of the tokenizer or text that encodes to exactly one token.
    ["all"]: every id of the tokenizer, i.e. the whole embedding and LM head trained beside the
    delta (PEFT's trainable_token_indices over the vocabulary). Its patches are (B, T, vocab),
    a second LM-head-sized matmul each way: for small vocabularies (the demo's 512)."""
    if tuple(spec) == ("all",):
        if tokenizer is None:
            raise ConfigError(f"{field}: 'all' needs the run's tokenizer (data.tokenizer) for its vocabulary")
        return tuple(range(tokenizer.vocab_size))
    ids = []
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ConfigError(f"{field}: {item!r} is neither a token id nor a token piece")
        if isinstance(item, str):
            if tokenizer is None:
                raise ConfigError(f"{field}: the piece {item!r} needs the run's tokenizer "
                                  "(data.tokenizer); or give token ids")
            tid = tokenizer.special_ids.get(item)
            if tid is None:
                enc = tokenizer.encode(item)
                if len(enc) != 1:
                    raise ConfigError(f"{field}: {item!r} is not one token of the tokenizer (it "
                                      f"encodes to {len(enc)}); its special tokens: "
                                      f"{sorted(tokenizer.special_ids)}")
                tid = enc[0]
            item = int(tid)
        ids.append(int(item))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{field}: a token is listed twice: {list(spec)} -> ids {ids}")
    return tuple(ids)


def resolved(dcfg, tokenizer, field: str):
    """The LoRA/adapter config with trainable_tokens as ids (what the delta functions take)."""
    return dataclasses.replace(dcfg, trainable_tokens=resolve(dcfg.trainable_tokens, tokenizer, field))


def ids_of(dcfg) -> tuple[int, ...]:
    ids = tuple(dcfg.trainable_tokens)
    if any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
        raise ConfigError(f"trainable_tokens {list(ids)}: pieces must be resolved to token ids "
                          "with the run's tokenizer first (model.tokens.resolved)")
    return ids


def _geometry(base) -> tuple[int, int, bool, jnp.dtype]:
    """(vocab, d_model, tied, dtype) of base params or ShapeDtypeStructs."""
    e = base["embed"]["embedding"]
    return e.shape[0], e.shape[1], "lm_head" not in base, e.dtype


def init_rows(base, ids: tuple[int, ...]) -> dict:
    """Zero rows in the embedding's dtype: the adapted model starts as its base."""
    vocab, d, tied, dt = _geometry(base)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"trainable_tokens: ids {bad} are outside the vocabulary [0, {vocab})")
    names = ("embed",) if tied else ("embed", "unembed")
    return {k: jnp.zeros((len(ids), d), dt) for k in names}


def logical_axes(tied: bool) -> dict:
    # d is named like the embedding's; n (a few tokens) is never sharded
    return {"embed": P(None, "embed")} if tied else {"embed": P(None, "embed"), "unembed": P(None, "embed")}


def check_rows(base, rows: dict | None, ids: tuple[int, ...]) -> None:
    want = {k: tuple(v.shape) for k, v in jax.eval_shape(lambda: init_rows(base, ids)).items()} if ids else None
    have = None if rows is None else {k: tuple(v.shape) for k, v in rows.items()}
    if have != want:
        raise ConfigError(f"trainable token rows {have} do not fit trainable_tokens={list(ids)} "
                          f"(expected {want}): use the config the delta was made with")


def attach(params: dict, rows: dict, ids: tuple[int, ...]) -> dict:
    """params + {"tokens": {**rows, "options": TokenOptions}} (what trunk and the head read)."""
    if "tokens" in params:
        raise ConfigError("these params already carry trainable token rows (a 'tokens' key)")
    return {**params, "tokens": {**rows, "options": TokenOptions(tuple(ids), "lm_head" not in params)}}


def _ids(tok: dict) -> jax.Array:
    return jnp.asarray(np.asarray(tok["options"].ids, np.int32))


def patch_embeddings(x_btd, tokens_bt, tok: dict):
    """The looked-up embeddings plus embed[i] at every position holding ids[i]."""
    hit_btn = tokens_bt[..., None] == _ids(tok)
    add_btd = jnp.einsum("btn,nd->btd", hit_btn.astype(jnp.float32), tok["embed"].astype(jnp.float32))
    return x_btd + add_btd.astype(x_btd.dtype)


def patch_logits(logits, hidden, tok: dict):
    """logits (..., V) fp32 plus hidden . u[i] in column ids[i]."""
    u_nd = tok["embed"] if tok["options"].tied else tok["unembed"]
    add = jnp.einsum("...d,nd->...n", hidden.astype(jnp.float32), u_nd.astype(jnp.float32))
    return logits.at[..., _ids(tok)].add(add)


def fold(params: dict, rows: dict, ids: tuple[int, ...], sign: float = 1.0) -> dict:
    """params with the rows added (sign=-1: removed) in the embedding table and LM head."""
    idx = np.asarray(ids, np.int32)
    out = dict(params)
    e = params["embed"]["embedding"]
    out["embed"] = {**params["embed"], "embedding": (e.astype(jnp.float32).at[idx].add(
        sign * rows["embed"].astype(jnp.float32))).astype(e.dtype)}
    if "lm_head" in params:
        w = params["lm_head"]["kernel"]
        out["lm_head"] = {**params["lm_head"], "kernel": (w.astype(jnp.float32).at[:, idx].add(
            sign * rows["unembed"].T.astype(jnp.float32))).astype(w.dtype)}
    return out
