"""Ranked responses for reward models: records -> one (K, T) block of rows per prompt, on grain.

Records (JSONL lines, Parquet rows or ArrayRecord JSON records; mixtures as for text):

    {"prompt": str, "responses": [best, ..., worst]}    # K >= 2, ranked best first
    {"prompt": str, "chosen": str, "rejected": str}     # a pair: K = 2

Other fields (the synthetic data's "task" and "scores") are ignored. `jaxllm data synth`
writes data/synth/reward/{train,eval}.jsonl in the first form.

Rendering. Each (prompt, response) becomes a chat (user = prompt, assistant = response) through
chat.py's template machinery (the tokenizer's own template, else built-in ChatML; or
data.chat_template) and is cut right after the answer's end-of-turn token, so every row ends
with the token the reward is read at. Rows are right-padded to train.seq_len with the pad id.

Batch (fixed shapes; index order is rank order, 0 = best):

    tokens, positions, segment_ids   int32 (B, K, T)  segment 1 on real tokens, 0 on padding
    response_mask                    int32 (B, K)     1 real response, 0 padding up to reward.k_max
    loss_mask                        int32 (B, K, T)  1 on the response's tokens and its end-of-turn

Long responses: `truncate` (data.long_examples) cuts the prompt side first (from the left,
after a preamble such as bos), always keeping the whole response and its end-of-turn; a
response that alone exceeds a row is dropped from its ranking (the order of the rest is kept);
a ranking left with fewer than 2 responses is dropped. `drop` drops any response that does not
fit whole. All of it is counted.

Bad records (fewer than 2 responses, more than reward.k_max, an empty response, one that only
repeats the prompt, two identical responses, non-string fields, malformed JSON) are skipped
and counted, or stop the run with data.strict=true. Before training every record is rendered
once (`scan`): process 0 prints one line of counts with the first bad locations (file:line),
and no usable ranking is an error. The pipeline then reads only the usable records.

Layout (as pipeline.py's, so the global batch does not depend on the process count): usable
records form a global stream (each source shuffled per epoch with its seed, repeated, mixed by
weight); logical shard s holds records s, s+S, s+2S, ...; global batch k takes R = B/S rows
from each shard in shard order; process p builds only the rows of its shards. Local batch k is
one element of a grain MapDataset over k, so the iterator state (grain.checkpoint) is the
batch index and a restore resumes exactly. Eval: the usable eval records once, in file order,
the last batch padded with all-masked blocks.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import NamedTuple

import grain
import numpy as np

from jaxllm.data import chat, layout, packing, pipeline
from jaxllm.data.config import DataConfig
from jaxllm.data.sources import BadRecords, DataError, Record
from jaxllm.data.tokenizer import fingerprint

BATCH_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "loss_mask")
_PAIR_KEYS = ("chosen", "rejected")


# --- records ----------------------------------------------------------------------------------

def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def check_ranking(obj: dict, where: str, k_max: int) -> tuple[str, list[str]]:
    """(prompt, responses best first) of a record, or a DataError saying what is wrong."""
    if "prompt" not in obj or not ("responses" in obj or all(k in obj for k in _PAIR_KEYS)):
        raise DataError(f"{where}: a ranking record needs 'prompt' and 'responses' (best first), or "
                        f"'prompt', 'chosen' and 'rejected' (fields present: {sorted(obj)[:10]})")
    if "responses" in obj and any(k in obj for k in _PAIR_KEYS):
        raise DataError(f"{where}: the record has both 'responses' and 'chosen'/'rejected': give one form")
    prompt = _text(obj["prompt"], "'prompt'", where)
    if not prompt.strip():
        raise DataError(f"{where}: 'prompt' is empty")
    if "responses" in obj:
        raw = obj["responses"]
        if not isinstance(raw, list):
            raise DataError(f"{where}: 'responses' must be a list of strings (best first), got "
                            f"{type(raw).__name__}")
        responses = [_text(r, f"response {i}", where) for i, r in enumerate(raw)]
    else:
        responses = [_text(obj[k], f"'{k}'", where) for k in _PAIR_KEYS]
    if len(responses) < 2:
        raise DataError(f"{where}: a ranking needs at least 2 responses, got {len(responses)}")
    if len(responses) > k_max:
        raise DataError(f"{where}: {len(responses)} responses, more than reward.k_max={k_max} "
                        f"(raise reward.k_max)")
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        body = r.strip()
        if not body:
            raise DataError(f"{where}: response {i} is empty")
        if body == prompt.strip():
            raise DataError(f"{where}: response {i} only repeats the prompt")
        if body in seen:
            raise DataError(f"{where}: responses {seen[body]} and {i} are the same text (a tie "
                            f"ranks nothing)")
        seen[body] = i
    if "scores" in obj:   # optional; when given, they must agree with the order (best first)
        scores = obj["scores"]
        numbers = isinstance(scores, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores)
        if not numbers or len(scores) != len(responses):
            raise DataError(f"{where}: 'scores' must be {len(responses)} finite numbers, one per response")
        for i in range(len(scores) - 1):
            if not scores[i] > scores[i + 1]:
                raise DataError(f"{where}: scores {scores[i]} and {scores[i + 1]} of responses {i} and {i + 1} "
                                f"{'tie (a tie ranks nothing)' if scores[i] == scores[i + 1] else 'rise'}: "
                                f"responses go best first, with strictly falling scores")
    return prompt, responses


def render_response(prompt: str, response: str, tokenizer, template: chat.ChatTemplate, seq_len: int,
                    long_examples: str = "truncate", where: str = "ranking") -> tuple[np.ndarray, np.ndarray, int]:
    """(token ids ending with the answer's end-of-turn token, the answer's mask over them,
    packing note DOC / TRUNCATED / DROPPED). Raises DataError for text the chat layer refuses."""
    messages = chat.check_messages([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], where)
    r = chat.render(messages, tokenizer, template)
    answer = np.flatnonzero(r.mask)
    end = int(answer[-1]) + 1                 # just after the end-of-turn token
    ids, mask, note = chat.fit(chat.Rendering(r.ids[:end], r.mask[:end], r.turn_starts, r.roles),
                               seq_len, long_examples)
    return ids, mask, note


class Encoded(NamedTuple):
    ids: list          # kept responses' token ids, rank order
    masks: list        # their answer masks (the response tokens and end-of-turn: DPO's targets)
    truncated: int     # responses whose prompt side was cut
    dropped: int       # responses that did not fit a row


class RankingEncode:
    """Record -> {tokens, positions, segment_ids: (k_max, T), response_mask: (k_max,)}."""

    def __init__(self, tokenizer, template: chat.ChatTemplate, seq_len: int, k_max: int,
                 long_examples: str = "truncate"):
        self.tok, self.template, self.seq_len = tokenizer, template, seq_len
        self.k_max, self.long_examples = k_max, long_examples

    def encode(self, rec: Record) -> Encoded:
        """Raises DataError for a bad record (the message starts with its location)."""
        prompt, responses = check_ranking(rec.obj, rec.where, self.k_max)
        kept, masks, truncated, dropped = [], [], 0, 0
        for resp in responses:
            ids, mask, note = render_response(prompt, resp, self.tok, self.template, self.seq_len,
                                        self.long_examples, rec.where)
            if note == packing.DROPPED:
                dropped += 1
                continue
            truncated += note == packing.TRUNCATED
            kept.append(ids)
            masks.append(mask)
        return Encoded(kept, masks, truncated, dropped)

    def empty(self) -> dict:
        """An all-masked block (eval padding): it adds no pair to any sum."""
        k, t = self.k_max, self.seq_len   # fresh arrays each: __call__ fills them in place
        return {"tokens": np.full((k, t), self.tok.pad_id, np.int32), "positions": np.zeros((k, t), np.int32),
                "segment_ids": np.zeros((k, t), np.int32), "response_mask": np.zeros((k,), np.int32),
                "loss_mask": np.zeros((k, t), np.int32)}

    def __call__(self, rec) -> dict:
        if isinstance(rec, packing.Bad):
            raise DataError(f"{rec.where}: {rec.message} (this record passed the start-up scan: "
                            f"did the file change during the run?)")
        enc = self.encode(rec)
        if len(enc.ids) < 2:
            raise DataError(f"{rec.where}: fewer than 2 responses fit seq_len={self.seq_len} (this "
                            f"record passed the start-up scan: did the file change during the run?)")
        out = self.empty()
        for i, (ids, mask) in enumerate(zip(enc.ids, enc.masks)):
            n = len(ids)
            out["loss_mask"][i, :n] = mask
            out["tokens"][i, :n] = ids
            out["positions"][i, :n] = np.arange(n)
            out["segment_ids"][i, :n] = 1
            out["response_mask"][i] = 1
        return out


# --- the start-up scan ------------------------------------------------------------------------

_SCANS: dict[tuple, dict] = {}   # scans already done in this process


def scan(sources: list, encoder: RankingEncode, *, label: str, strict: bool, verbose: bool = True,
         show: int = 5) -> dict:
    """Render every record once. -> counts, with "usable": per source, the indices of the
    records that make a ranking. strict: the first bad record raises; no usable ranking raises.
    Prints one line when `verbose` (process 0). Cached per process by file versions."""
    paths = [p for _, src in sources for p in src.source.files.paths]
    key = (label, tuple(c for c, _ in sources), encoder.template, fingerprint(encoder.tok), encoder.seq_len,
           encoder.k_max, encoder.long_examples, strict, tuple(pipeline._file_stamp(p) for p in paths))
    first_time = key not in _SCANS
    if first_time:
        c = {"records": 0, "rankings": 0, "pairs": 0, "truncated": 0, "dropped_responses": 0,
             "dropped_rankings": 0, "bad": 0, "most_responses": 0}
        bad, usable = BadRecords(strict, show), []
        for _, src in sources:
            good = []
            for i in range(len(src)):
                c["records"] += 1
                ok, enc = bad.read(lambda: encoder.encode(src[i]))
                if not ok:
                    continue
                c["truncated"] += enc.truncated
                c["dropped_responses"] += enc.dropped
                if len(enc.ids) < 2:
                    c["dropped_rankings"] += 1
                    continue
                c["rankings"] += 1
                c["pairs"] += len(enc.ids) * (len(enc.ids) - 1) // 2
                c["most_responses"] = max(c["most_responses"], len(enc.ids))
                good.append(i)
            usable.append(np.asarray(good, np.int64))
        c["bad"], c["first_bad"], c["usable"] = bad.count, bad.first, usable
        if not c["rankings"]:
            why = [f"{c['bad']} bad (first: {'; '.join(bad.first[:2])})"] if c["bad"] else []
            if c["dropped_rankings"]:
                why.append(f"{c['dropped_rankings']} left with fewer than 2 responses that fit "
                           f"seq_len={encoder.seq_len}")
            raise DataError(f"no usable rankings in {label} data {[cfg.path for cfg, _ in sources]}: "
                            f"{c['records']} records, {', '.join(why) or 'none'}")
        _SCANS[key] = c
    if verbose and first_time:   # an eval iterator made again at every evaluation says it once
        print(summary(_SCANS[key], label, len(sources), encoder), file=sys.stderr, flush=True)
    return _SCANS[key]


def summary(c: dict, label: str, n_sources: int, encoder: RankingEncode) -> str:
    """The scan's one line: what was kept, cut, dropped and skipped (first bad locations)."""
    bad = f"; first: {' | '.join(c['first_bad'])}" if c["first_bad"] else ""
    most, k = c["most_responses"], encoder.k_max
    # each ranking is k_max rows in the step: rows beyond the largest ranking are computed for nothing
    waste = (f"; reward.k_max={k} but no ranking has more than {most} responses: set reward.k_max={most} "
             f"({k - most} of {k} rows per ranking are padding)" if 0 < most < k else "")
    return (f"reward {label} data: {c['records']} records in {n_sources} source{'s' * (n_sources > 1)} -> "
            f"{c['rankings']} rankings ({c['pairs']} pairs); {c['truncated']} responses had the prompt cut "
            f"to fit seq_len={encoder.seq_len}, {c['dropped_responses']} responses dropped as too long "
            f"(data.long_examples={encoder.long_examples}), {c['dropped_rankings']} rankings left with < 2 "
            f"responses dropped, {c['bad']} bad records skipped{waste}{bad}")


# --- the pipeline -----------------------------------------------------------------------------

class UsableRecords:
    """The records of a source that the scan found usable, as a grain data source."""

    def __init__(self, view: chat.RecordView, indices: np.ndarray):
        self.view, self.indices = view, indices
        self.source = view.source          # file list, for stamps and messages

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int) -> Record:
        return self.view[int(self.indices[i])]


def check_data_config(cfg: DataConfig) -> None:
    """Refuse data keys that would be silently ignored by this pipeline."""
    if cfg.kind != "chat":
        raise ValueError(f"reward data are rankings rendered as chats: set data.kind=chat "
                         f"(got data.kind={cfg.kind})")
    if cfg.num_workers:
        raise ValueError(f"data.num_workers={cfg.num_workers}: the ranking pipeline reads in threads of "
                         f"this process; set data.num_workers=0")
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    for key in ("packing", "packing_bins"):
        if getattr(cfg, key) != defaults[key]:
            raise ValueError(f"data.{key} does not apply to rankings (one response per row, no "
                             f"packing); remove it")


class _Setup(NamedTuple):
    encoder: RankingEncode
    scan: dict
    docs: grain.MapDataset
    shards: range        # this process's logical shards
    S: int
    R: int


def _setup(cfg: DataConfig, configs, *, seq_len: int, global_batch_size: int, seed: int, k_max: int,
           tokenizer, process_index, process_count, label: str, train: bool) -> _Setup:
    check_data_config(cfg)
    tokenizer, p, n = pipeline._resolve(cfg, tokenizer, process_index, process_count)
    S, R, m = pipeline._layout(cfg, global_batch_size, n)
    views = [(c, chat.open_chat_source(c)) for c in configs]
    encoder = RankingEncode(tokenizer, chat.load_template(cfg.chat_template, tokenizer), seq_len, k_max,
                            cfg.long_examples)
    counts = scan(views, encoder, label=label, strict=cfg.strict, verbose=p == 0)
    for (c, _), idx in zip(views, counts["usable"]):
        if not len(idx):   # a mixture would silently lose it (and its weight)
            raise DataError(f"data source '{c.path}' has no usable rankings (see the {label} data "
                            f"line above); remove it or fix its records")
    usable = [(c, UsableRecords(v, idx)) for (c, v), idx in zip(views, counts["usable"])]
    seeds = pipeline._seeds(cfg, seed, len(usable))
    docs = pipeline._doc_stream(usable, cfg, seeds, shuffle=train and cfg.shuffle, repeat=train)
    return _Setup(encoder, counts, docs, range(p * m, (p + 1) * m), S, R)


def _batches(s: _Setup, num_batches: int, threads: int = 2) -> grain.DatasetIterator:
    """Local batch k: for each own shard, its rows k*R .. k*R+R-1 (records shard + S*row of
    the global stream); a row past the end of a finite stream is an all-masked block."""
    n_docs = len(s.docs)

    def block(j: int) -> dict:
        return s.encoder(s.docs[j]) if j < n_docs else s.encoder.empty()

    def make(k: int) -> dict:
        rows = [block(sh + s.S * (k * s.R + r)) for sh in s.shards for r in range(s.R)]
        return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}
    ds = grain.MapDataset.range(num_batches).map(make)
    return pipeline._tracked(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                                       prefetch_buffer_size=8))))


def make_train_iterator(data_cfg: DataConfig, *, seq_len: int, global_batch_size: int, seed: int,
                        k_max: int, tokenizer=None, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """Endless iterator of this process's rows of each global batch: tokens/positions/
    segment_ids (B_local, k_max, seq_len) and response_mask (B_local, k_max), int32.
    The start-up scan's counts are in `it.scan`."""
    s = _setup(data_cfg, data_cfg.sources, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
               k_max=k_max, tokenizer=tokenizer, process_index=process_index, process_count=process_count,
               label="train", train=True)
    it = layout.global_index(_batches(s, 1 << 40))   # the global batch index: any process count
    it.scan = s.scan
    return it


def make_eval_iterator(data_cfg: DataConfig, *, seq_len: int, global_batch_size: int, k_max: int,
                       seed: int = 0, tokenizer=None, process_index: int | None = None,
                       process_count: int | None = None, num_batches: int | None = None):
    """Finite, deterministic batches over data.eval_sources: each usable ranking once, in file
    order, the last batch padded with all-masked blocks. Every process yields the same number
    of batches: the whole set (from the scan's count), or at most `num_batches` /
    data.eval_batches when given."""
    if not data_cfg.eval_sources:
        raise ValueError("make_eval_iterator needs data.eval_sources (held-out rankings)")
    s = _setup(data_cfg, data_cfg.eval_sources, seq_len=seq_len, global_batch_size=global_batch_size,
               seed=seed, k_max=k_max, tokenizer=tokenizer, process_index=process_index,
               process_count=process_count, label="eval", train=False)
    whole = max(1, math.ceil(math.ceil(len(s.docs) / s.S) / s.R))
    limit = num_batches or data_cfg.eval_batches
    it = _batches(s, min(whole, limit) if limit else whole)
    it.scan = s.scan
    return it
