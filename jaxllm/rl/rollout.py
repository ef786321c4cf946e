"""Rollouts: prompts -> sampled responses -> one (B, T) batch aligned to tokens for scoring
and for the PPO / GRPO step.

Prompt records are JSONL/Parquet/ArrayRecord objects {"prompt": str, "task": {...}} (the
embedded `ppo` data) or {"messages": [...]} without the final assistant turn. Each is rendered
by the chat template up to the assistant header (data/chat.chat_prompt). Before the run, every
record is rendered once (`scan_prompts`, as SFT's data/chat.scan): bad records (malformed JSON,
an unknown role, no prompt, ...) are skipped and counted with their first file:line locations,
or stop the run at start-up with data.strict=true; prompts longer than rl.max_prompt_tokens
keep their last tokens (data.long_examples=drop leaves them out); one line says the counts.
The stream is shuffled per epoch with a seed and built on grain, so its position checkpoints
with the run; every process reads the same global stream and keeps its own rows, so the
prompts do not depend on the process count.

Layout of a rollout batch (everything indexed by token, see objectives/policy.py):
    tokens        (B, P + N)  left-padded prompt, then the response (pad after a stop)
    segment_ids   (B, P + N)  1 on real prompt and response tokens, 0 on padding
    positions     (B, P + N)  RoPE positions counting real tokens only
    response_mask (B, P + N)  1 on sampled response tokens (up to and including the stop)
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator, NamedTuple, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.data import layout
from jaxllm.data.chat import chat_prompt, check_messages, resolve_template
from jaxllm.data.sources import BadRecords, DataError, open_source
from jaxllm.model.generate import Generation


def prompt_messages(obj: dict, where: str) -> list[dict]:
    """A prompt record -> its messages, or a DataError naming `where` (file:line) and why."""
    if "messages" in obj:
        msgs = check_messages(obj["messages"], where, need_assistant=False)
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{where}: an RL prompt ends before the assistant's answer (drop the last turn)")
        return msgs
    if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        return [{"role": "user", "content": obj["prompt"]}]
    raise DataError(f"{where}: an RL prompt record needs a non-empty 'prompt' string or 'messages'")


class _Render:
    """Record -> {"ids": prompt ids (last max_tokens), "record": the JSON object, "cut": bool}."""

    def __init__(self, tokenizer, template, max_tokens: int, need_task: bool = False):
        self.tok, self.template, self.max_tokens, self.need_task = tokenizer, template, max_tokens, need_task

    def ids(self, rec) -> list[int]:
        """The whole prompt's ids; a DataError naming the record's file:line when it is bad
        (need_task: also when its 'task' is not one the programmatic reward grades)."""
        try:
            if self.need_task:
                from jaxllm.data.synthetic_tasks import task_problem
                problem = task_problem(rec.obj.get("task")) if "task" in rec.obj else "no 'task'"
                if problem:
                    raise DataError(f"{problem}: rl.reward_model is empty, so each prompt's 'task' gives its reward")
            return chat_prompt(prompt_messages(rec.obj, rec.where), self.tok, self.template)
        except DataError as e:
            msg = str(e)
            raise DataError(msg if msg.startswith(rec.where) else f"{rec.where}: {msg}") from None

    def __call__(self, rec) -> dict:
        ids = self.ids(rec)
        return {"ids": ids[-self.max_tokens:], "record": rec.obj, "cut": len(ids) > self.max_tokens,
                "pad": isinstance(rec, _Pad)}


class _Records:
    def __init__(self, sources):
        self.sources = sources
        self.sizes = [len(s) for s in sources]

    def __len__(self):
        return sum(self.sizes)

    def __getitem__(self, i):
        for s, n in zip(self.sources, self.sizes):
            if i < n:
                return s.record(i)
            i -= n
        raise IndexError(i)


class _Pad(NamedTuple):
    """A prompt repeated to fill the last batch of a single pass: generated, never counted."""
    obj: dict
    where: str


class _Kept:
    """The records the start-up scan kept, in file order (a grain data source), then `pad`
    repeats of the last one."""

    def __init__(self, records: _Records, keep: list[int], pad: int = 0):
        self.records, self.keep, self.pad = records, keep, pad

    def __len__(self):
        return len(self.keep) + self.pad

    def __getitem__(self, i):
        if i >= len(self.keep):
            return _Pad(*self.records[self.keep[-1]])
        return self.records[self.keep[i]]


def scan_prompts(records: _Records, render: _Render, *, strict: bool, drop_long: bool,
                 show: int = 5) -> tuple[list[int], dict]:
    """Render every record once -> (the indices of the usable prompts, counts of records, prompts,
    cut (kept their last max_tokens), dropped (too long, drop_long), bad, and the first `show`
    bad records' messages). strict: the first bad record raises, naming its file:line."""
    keep, bad = [], BadRecords(strict, show)
    counts = {"records": len(records), "prompts": 0, "cut": 0, "dropped": 0}
    for i in range(len(records)):
        ok, ids = bad.read(lambda: render.ids(records[i]))
        if not ok:
            continue
        n = len(ids)
        if n > render.max_tokens and drop_long:
            counts["dropped"] += 1
            continue
        counts["cut"] += n > render.max_tokens
        counts["prompts"] += 1
        keep.append(i)
    counts["bad"], counts["first_bad"] = bad.count, bad.first
    return keep, counts


def prompt_iterator(source_cfgs: Sequence, tokenizer, *, template: str = "", max_tokens: int,
                    global_batch: int, seed: int, shuffle: bool = True, repeat: bool = True,
                    strict: bool = False, drop_long: bool = False, label: str = "train",
                    log: Callable[[str], None] | None = None, need_task: bool = False):
    """grain iterator of lists (one per global batch) of this process's rendered prompts, over
    the records `scan_prompts` kept; `log` gets its one line of counts (default: stderr on
    process 0)."""
    if not source_cfgs:
        raise DataError("RL needs prompts: set data.sources to JSONL/Parquet files of "
                        "{\"prompt\": ...} records (e.g. data/synth/ppo/train.jsonl)")
    records = _Records([open_source(c, records=True) for c in source_cfgs])
    paths = [c.path for c in source_cfgs]
    if len(records) == 0:
        raise DataError(f"no RL prompts in {paths}")
    render = _Render(tokenizer, resolve_template(tokenizer, template or None), max_tokens, need_task)
    keep, c = scan_prompts(records, render, strict=strict, drop_long=drop_long)
    line = (f"RL {label} prompts: {c['records']} records in {paths} -> {c['prompts']} prompts "
            f"({c['cut']} cut to their last rl.max_prompt_tokens={max_tokens} tokens), {c['dropped']} dropped "
            f"as longer (data.long_examples=drop), {c['bad']} bad records skipped")
    if c["first_bad"]:
        line += "; first: " + " | ".join(c["first_bad"])
    if not keep:
        raise DataError(f"no usable RL prompts: {line}")
    if log is not None:
        log(line)
    elif jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)
    # one pass (held-out prompts): the last batch is filled up with rows marked "pad", so every
    # batch has the global shape (one compiled generation; whole rows per device and process)
    ds = grain.MapDataset.source(_Kept(records, keep, 0 if repeat else -len(keep) % global_batch))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(render)
    n, p = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise DataError(f"{global_batch} prompts per iteration do not split over {n} processes")
    local = global_batch // n
    ds = ds.batch(global_batch, drop_remainder=repeat, batch_fn=lambda rows: rows[p * local:(p + 1) * local])
    return layout.global_index(iter(ds.to_iter_dataset()))   # the global batch index: any process count


def repeat_prompts(prompts: list[dict], group_size: int) -> list[dict]:
    """Each prompt group_size times in a row (GRPO's groups are consecutive rows)."""
    return [p for p in prompts for _ in range(group_size)]


def rollout_batch(gen: Generation) -> dict:
    """A Generation -> the (B, P + N) batch of the module docstring (host arrays)."""
    pm, rm = np.asarray(gen.prompt_mask, np.int32), np.asarray(gen.mask, np.int32)
    tokens = np.concatenate([np.asarray(gen.prompt_tokens), np.asarray(gen.tokens)], axis=1).astype(np.int32)
    seg = np.concatenate([pm, rm], axis=1)
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    response = np.concatenate([np.zeros_like(pm), rm], axis=1)
    return {"tokens": tokens, "segment_ids": seg, "positions": positions, "response_mask": response}


def response_texts(tokenizer, gen: Generation, stop_ids: Sequence[int]) -> list[str]:
    """Decoded responses without their stop token."""
    out = []
    for toks, m in zip(np.asarray(gen.tokens), np.asarray(gen.mask)):
        ids = [int(t) for t, k in zip(toks, m) if k and int(t) not in stop_ids]
        out.append(tokenizer.decode(ids))
    return out


def ended(gen: Generation, stop_ids: Sequence[int]) -> np.ndarray:
    """(B,) bool: the response stopped by itself (its last real token is a stop token)."""
    toks, m = np.asarray(gen.tokens), np.asarray(gen.mask)
    last = np.maximum(m.sum(1) - 1, 0)
    return (m.sum(1) > 0) & np.isin(toks[np.arange(len(toks)), last], list(stop_ids))


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the response tokens."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)

    def var(x):
        mu = jnp.sum(x * m) / n
        return jnp.sum(jnp.square(x - mu) * m) / n
    return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def batches_of(rows: int, minibatches: int, key: jax.Array) -> Iterator[np.ndarray]:
    """Row indices of each minibatch of one pass, in a seeded random order."""
    perm = np.asarray(jax.random.permutation(key, rows))
    return iter(np.split(perm, minibatches))
