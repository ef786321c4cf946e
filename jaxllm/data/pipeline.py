"""Training and eval batches from text or chat files: grain all the way, sharded per host,
resumable. (data.kind=text: packing.py's chain per shard; data.kind=chat: chat.py's.)

How the global batch sequence is made independent of the number of processes
-----------------------------------------------------------------------------
Documents are divided among S *logical shards* (S = data.num_shards, default
gcd(global_batch_size, 64) on up to 64 processes, or any process count dividing 64; see
DataConfig.num_shards for other counts), fixed by the config, not by the machine:

  global document stream   mixture of sources, each shuffled per epoch (seeded), repeated
  shard s                  documents s, s+S, s+2S, ... of that stream
  shard s's rows           its own tokenize -> split -> pack chain (own packer, own seed)
  global batch k           for s = 0..S-1: rows [k*R, (k+1)*R) of shard s, R = B/S

Process p of n owns shards [p*S/n, (p+1)*S/n) and reads, tokenizes and packs only their
documents (opening a source builds its line/row index, which scans the file bytes, but only
the process's own records are parsed and tokenized); its rows are exactly rows
[p*B/n, (p+1)*B/n) of every global batch, which is what
`jax.make_array_from_process_local_data` expects for a batch sharded over processes in order.
So the same seed gives the same global batches on 1 process or n (any n dividing S).

grain does the work: shards are interleaved with `InterleaveIterDataset` (cycle = shards per
process). With num_workers = W, `mp_prefetch` hands worker w the shards w, w+W, ... (grain
slices an interleave by its list of datasets) and reads the workers round-robin; each worker
stacks one batch per shard, and the stacks are transposed back into shard order. So the batches
are also the same for any worker count dividing the shards per process (0 = in-process).
Iterator state (get_state/set_state, grain.checkpoint) restores exactly, with the same
num_workers; on another process (or worker) count, `remap_state` rebuilds this process's state
from every process's saved one (layout.py), since a state is one state per logical shard.
Bookkeeping counts (documents, split pieces, skipped records, padding) are in
`iterator.stats` and are part of that state.

Chat data is first rendered once in full (chat.scan): process 0 prints one line of counts
(examples, truncated, dropped, bad records), and no usable example is an error.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import math
import os
import sys
import weakref
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.data import chat, packing
from jaxllm.data.config import DataConfig
from jaxllm.data.sources import DataError, open_source
from jaxllm.data.tokenizer import Tokenizer, check_vocab, fingerprint, load_tokenizer

# grain iterators own prefetch threads; closing them only from __del__ during interpreter
# teardown prints spurious tracebacks, so close the ones still alive at exit, in order.
_LIVE: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE):
        it.close()
    gc.collect()


def _tracked(it: grain.DatasetIterator) -> grain.DatasetIterator:
    _LIVE.add(it)
    return it


@contextlib.contextmanager
def closing_batches(it):
    """`with closing_batches(make_eval()) as batches: for b in batches: ...`: the iterator and
    its prefetch threads are closed when the loop ends or raises, not left to the garbage
    collector. Why: grain's DatasetIterator.__del__ closes the iterator, joining its threads, from
    whichever thread the collector happens to run in; when that thread holds
    concurrent.futures' global submit lock (a prefetch thread inside ThreadPoolExecutor.submit)
    and a thread being joined waits for that lock, the process hangs. Seen on Python 3.13 /
    grain 0.2.18 (the default test run hung in test_data_long_docs, 2026-12-06)."""
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _layout(cfg: DataConfig, global_batch_size: int, process_count: int) -> tuple[int, int, int]:
    """(num shards S, rows per shard per batch R, shards per process m), validated."""
    S = cfg.shard_count(global_batch_size, process_count)
    if global_batch_size % S:
        raise ValueError(f"data.num_shards={S} must divide the global batch size {global_batch_size}")
    if S % process_count:
        raise ValueError(f"{process_count} processes cannot split {S} logical data shards evenly; "
                         f"set data.num_shards to a multiple of {process_count} that divides "
                         f"the global batch size {global_batch_size}")
    m = S // process_count
    if cfg.num_workers and m % cfg.num_workers:
        raise ValueError(f"data.num_workers={cfg.num_workers} must divide the {m} data shards each "
                         f"process reads (data.num_shards={S} / {process_count} processes)")
    return S, global_batch_size // S, m


def _seeds(cfg: DataConfig, seed: int, n: int) -> list[int]:
    """n independent 31-bit seeds from (train seed, data seed)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(cfg.seed) & 0xFFFFFFFF])
    return [int(x) for x in ss.generate_state(n) & 0x7FFFFFFF]


def _open(cfg: DataConfig, configs) -> list:
    """(source config, source) pairs: documents for text, whole records for chat."""
    if cfg.kind == "chat":
        return [(c, chat.open_chat_source(c)) for c in configs]
    return [(c, open_source(c)) for c in configs]


def _doc_stream(sources, cfg: DataConfig, seeds: list[int], *, shuffle: bool, repeat: bool):
    """The global document MapDataset: per-source shuffle (reshuffled each epoch) + repeat,
    mixed by weight. Without repeat (eval) sources are concatenated in order. Text documents
    are references, read where they are tokenized; chat records are read whole (bad ones
    become `Bad`, already reported by the start-up scan)."""
    parts = []
    for i, (src_cfg, src) in enumerate(sources):
        if cfg.kind == "chat":
            src = packing.GuardedSource(src, not cfg.strict, max_warnings=0)
        else:
            src = packing.LazyDocs(src)
        ds = grain.MapDataset.source(src)
        if shuffle:
            ds = ds.shuffle(seed=seeds[i])
        parts.append(ds.repeat(None) if repeat else ds)
    if len(parts) == 1:
        return parts[0]
    if repeat:
        return grain.MapDataset.mix(parts, [c.weight for c, _ in sources])
    return grain.MapDataset.concatenate(parts)


def load_tokenizer_for(data_cfg: DataConfig, model_vocab_size: int | None = None) -> Tokenizer:
    """The configured tokenizer, checked against the model and the data config at start-up
    (not mid-run)."""
    if not data_cfg.tokenizer:
        raise ValueError("data.tokenizer is empty: give the tokenizer .model file or directory "
                         "(train one with `jaxllm tokenizer train`)")
    tok = load_tokenizer(data_cfg.tokenizer)
    if model_vocab_size is not None:
        check_vocab(tok, model_vocab_size)
    _check_tokenizer(data_cfg, tok)
    return tok


def _check_tokenizer(cfg: DataConfig, tok) -> None:
    if cfg.kind != "text":
        return
    for flag, name, i in ((cfg.add_bos, "bos", tok.bos_id), (cfg.add_eos, "eos", tok.eos_id)):
        if flag and i is None:
            raise ValueError(f"data.add_{name}=true but the tokenizer {tok.path} defines no {name} "
                             f"token; set data.add_{name}=false")


def _resolve(cfg: DataConfig, tokenizer, process_index, process_count):
    if cfg.kind not in ("text", "chat"):
        raise ValueError(f"the grain pipeline reads files (data.kind=text or chat); got data.kind={cfg.kind!r}")
    if tokenizer is None:
        tokenizer = load_tokenizer_for(cfg)
    _check_tokenizer(cfg, tokenizer)
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if not 0 <= p < n:
        raise ValueError(f"process_index {p} out of range for process_count {n}")
    return tokenizer, p, n


class _StripStats(grain.IterDataset):
    """Last stage: drops the "_stats" rows from each batch and keeps running totals in the
    iterator state, so the counts survive a checkpoint/restore like everything else."""

    def __iter__(self):
        return _StripStatsIterator(self._parent.__iter__())


class _StripStatsIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self.stats = {"batches": 0, **{k: 0 for k in packing.STATS_NAMES}, "tokens": 0,
                      "padding_tokens": 0}

    def __next__(self) -> dict:
        self._assert_not_closed()
        try:
            batch = next(self._parent)
        except StopIteration:
            raise
        except BaseException:
            # a failed pipeline is finished: close it now (see closing_batches for why not at GC)
            self.close()
            raise
        counts = batch.pop(packing.STATS_KEY).reshape(-1, len(packing.STATS_NAMES)).sum(0).tolist()
        # a truncated chat example is still a packed example
        counts[packing.DOC] += counts[packing.TRUNCATED]
        real = int(batch["segment_ids"].astype(bool).sum())
        s = self.stats
        s["batches"] += 1
        for name, n in zip(packing.STATS_NAMES, counts):
            s[name] += n
        s["tokens"] += real
        s["padding_tokens"] += batch["tokens"].size - real
        return batch

    layout: dict | None = None   # train iterators: {"shards", "processes", "process", "workers"}

    def get_state(self):
        state = {"parent": self._parent.get_state(), "stats": dict(self.stats)}
        if self.layout is not None:
            state["layout"] = dict(self.layout)
        return state

    def remap_state(self, states: list[dict]) -> dict:
        """This process's state from the states every process of a run with another process
        count saved (layout.py): shard states in global shard order, re-split. The running
        counts of all old processes go to process 0 (the totals over processes stay right)."""
        mine = self.layout
        if mine is None:
            raise DataError("only training iterators can be restored on another process count")
        old = [st.get("layout") for st in states]
        if any(o is None for o in old):
            raise DataError("the checkpoint's data state predates process-count changes (no layout "
                            "in it): resume it on the process count that wrote it")
        S, n_old = old[0]["shards"], len(states)
        if any(o["shards"] != S or o["processes"] != n_old for o in old) or \
                [o["process"] for o in old] != list(range(n_old)):
            raise DataError(f"the checkpoint's data states do not form one layout: {old}")
        if S != mine["shards"]:
            raise DataError(f"the checkpoint's data has {S} logical shards and this run "
                            f"{mine['shards']}: set data.num_shards={S} to continue its batch sequence")
        shards = [sh for st, o in zip(states, old)
                  for sh in _shard_states(st["parent"], S // n_old, o["workers"])]
        m, p = S // mine["processes"], mine["process"]
        stats = {k: sum(st["stats"][k] for st in states) if p == 0 else 0 for k in self.stats}
        stats["batches"] = states[0]["stats"]["batches"]   # local batches = global batches
        return {"parent": _with_shard_states(shards[p * m:(p + 1) * m], mine["workers"]),
                "stats": stats, "layout": dict(mine)}

    def close(self):
        super().close()
        # Let go of the closed pipeline so its prefetch iterators are collected while the
        # interpreter is alive: grain's close() fails if first run during teardown.
        self._parents = ()

    def set_state(self, state):
        parent, saved, mine = state["parent"], state.get("layout"), self.layout
        if saved is not None and mine is not None and saved != mine:
            if {k: saved[k] for k in ("shards", "processes", "process")} != \
                    {k: mine[k] for k in ("shards", "processes", "process")}:
                raise DataError(f"data state saved with layout {saved} does not fit this iterator "
                                f"({mine}); remap_state maps a run's states onto another process count")
            # only data.num_workers changed: the same shards, regrouped by worker
            m = mine["shards"] // mine["processes"]
            parent = _with_shard_states(_shard_states(parent, m, saved["workers"]), mine["workers"])
            if mine["process"] == 0:
                print(f"data: the iterator state saved with data.num_workers={saved['workers']} is regrouped "
                      f"onto data.num_workers={mine['workers']} (same shards, the batch sequence continues)",
                      file=sys.stderr, flush=True)
        self._parent.set_state(parent)
        self.stats = dict(state["stats"])


def _interleaved(state: dict, count: int) -> list:
    """The `count` iterator states of an InterleaveIterDataset state taken at a batch boundary
    (every batch reads each interleaved iterator once, so the cycle is back at its start)."""
    ok = (state.get("next_index_in_cycle") == 0 and state.get("iterators_in_use_indices") == list(range(count))
          and len(state.get("iterators_in_use_states") or ()) == count and not any(state.get("exhausted", [1]))
          and not state.get("future_states"))
    if not ok:
        raise DataError("the saved data state is not that of a training iterator between two "
                        "batches; it cannot be mapped onto another process count")
    return state["iterators_in_use_states"]


def _shard_states(state: dict, m: int, workers: int) -> list:
    """A process's m shard states in shard order, from its combined state (_combine_shards:
    one interleave of the shards, or W workers each interleaving shards w, w+W, ...)."""
    if not workers:
        return list(_interleaved(state, m))
    per_worker = [_interleaved(w, m // workers) for w in _interleaved(state, workers)]
    return [per_worker[s % workers][s // workers] for s in range(m)]


def _interleave_state(states: list) -> dict:
    """An InterleaveIterDataset state between two batches, holding `states` (the form that
    _interleaved reads; grain's mp_prefetch keeps one such state per started worker)."""
    return {"next_index_in_cycle": 0, "next_index_in_datasets": len(states),
            "iterators_in_use_indices": list(range(len(states))), "iterators_in_use_states": list(states),
            "exhausted": [0] * len(states), "future_states": {}}


def _with_shard_states(shards: list, workers: int) -> dict:
    """The combined state of a process that reads `shards` (in shard order) with `workers`."""
    if not workers:
        return _interleave_state(shards)
    return _interleave_state([_interleave_state(shards[w::workers]) for w in range(workers)])


def _combine_shards(shards: list, workers: int, worker_buffer: int, limit: int | None = None):
    """m shard pipelines yielding (R, T) batches -> local batches (m*R, T), shard-major.

    Each worker stacks one batch from each of its shards before handing it over (one transfer
    per worker per step instead of one per shard); worker w holds shards w, w+W, ..., so the
    (W, m/W) stack is transposed back into shard order.
    """
    m, W = len(shards), max(workers, 1)
    ds = grain.experimental.InterleaveIterDataset(shards, cycle_length=m).batch(m // W, drop_remainder=True)
    if workers:
        # grain's worker start-up reads absl flags, which raise unless parsed; a program not
        # run under absl.app has not parsed them, so take their defaults.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=worker_buffer))

    def merge(b: dict) -> dict:  # (W, m/W, R, ...) -> (m*R, ...), row order = shard order
        return {k: v.swapaxes(0, 1).reshape((-1,) + v.shape[3:]) for k, v in b.items()}
    ds = ds.batch(W, drop_remainder=True).map(merge)
    if limit is not None:
        ds = grain.experimental.LimitIterDataset(ds, count=limit)
    return _StripStats(ds)


def _chat_encoder(cfg: DataConfig, sources, tokenizer, seq_len: int, *, label: str, verbose: bool):
    """kind=chat: (the encoder every shard uses, the start-up scan's counts); else (None, None)."""
    if cfg.kind != "chat":
        return None, None
    encoder = chat.ChatEncode(tokenizer, chat.load_template(cfg.chat_template, tokenizer), seq_len,
                              cfg.long_examples, cfg.strict)
    return encoder, chat.scan(sources, encoder, label=label, verbose=verbose)


def _rows(cfg: DataConfig, docs: grain.MapDataset, tokenizer, encoder, *, seq_len: int, seed: int,
          shuffle_bins: bool = True) -> grain.IterDataset:
    """One shard's packed rows, by data.kind."""
    if encoder is not None:
        return chat.chat_rows(docs, encoder, mode=cfg.packing, num_bins=cfg.packing_bins, seed=seed,
                              shuffle_bins=shuffle_bins)
    return packing.packed_rows(docs, tokenizer, seq_len=seq_len, mode=cfg.packing, num_bins=cfg.packing_bins,
                               seed=seed, add_bos=cfg.add_bos, add_eos=cfg.add_eos, shuffle_bins=shuffle_bins,
                               max_doc_chars=cfg.max_doc_chars, skip_bad_records=cfg.skip_bad_records)


def make_train_iterator(data_cfg: DataConfig, *, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        tokenizer: Tokenizer | None = None) -> grain.DatasetIterator:
    """Infinite iterator of this process's rows of each global batch: dict of int32
    (global_batch_size // process_count, seq_len) arrays tokens/positions/segment_ids/loss_mask.
    Running counts (documents, split pieces, skipped records, chat examples truncated or
    dropped, padding) are in `it.stats`; for chat, the start-up scan's counts in `it.scan`."""
    cfg = data_cfg
    tokenizer, p, n = _resolve(cfg, tokenizer, process_index, process_count)
    S, R, m = _layout(cfg, global_batch_size, n)
    sources = _open(cfg, cfg.sources)
    encoder, scan = _chat_encoder(cfg, sources, tokenizer, seq_len, label="train", verbose=p == 0)
    seeds = _seeds(cfg, seed, len(sources) + S)
    docs = _doc_stream(sources, cfg, seeds, shuffle=cfg.shuffle, repeat=True)
    shards = [_rows(cfg, docs[s::S], tokenizer, encoder, seq_len=seq_len, seed=seeds[len(sources) + s])
              .batch(R, drop_remainder=True) for s in range(p * m, (p + 1) * m)]
    it = _tracked(iter(_combine_shards(shards, cfg.num_workers, cfg.worker_buffer_size)))
    it.scan = scan
    it.layout = {"shards": S, "processes": n, "process": p, "workers": cfg.num_workers}
    return it


def _padded_shard(docs: grain.MapDataset, tokenizer, encoder, cfg: DataConfig, seq_len: int, seed: int):
    """An eval shard: its rows once, in order, then padding rows forever (cut by the caller)."""
    rows = _rows(cfg, docs, tokenizer, encoder, seq_len=seq_len, seed=seed, shuffle_bins=False)
    pad = grain.MapDataset.source([packing.empty_row(seq_len, tokenizer.pad_id)]).repeat(None)
    # An interleave with cycle length 1 is grain's concatenation of iterables.
    return rows, grain.experimental.InterleaveIterDataset([rows, pad.to_iter_dataset()], cycle_length=1)


def _count(ds: grain.IterDataset) -> int:
    with closing_batches(iter(ds)) as it:   # closed on a bad record too
        return sum(1 for _ in it)


_EVAL_BATCHES: dict[tuple, int] = {}  # eval batch counts already computed in this process


def _file_stamp(path: str) -> tuple:
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


def make_eval_iterator(data_cfg: DataConfig, *, seq_len: int, global_batch_size: int, seed: int = 0,
                       process_index: int | None = None, process_count: int | None = None,
                       tokenizer: Tokenizer | None = None, num_batches: int | None = None):
    """Finite, deterministic batches over data.eval_sources (in file order, read once), the
    last one padded with all-masked rows. Every process yields the same number of batches:
    unless `num_batches`/data.eval_batches is given, it is counted from all shards (held-out
    sets are small), so multi-host eval loops stay in step."""
    cfg = data_cfg
    if not cfg.eval_sources:
        raise ValueError("make_eval_iterator needs data.eval_sources (held-out files)")
    tokenizer, p, n = _resolve(cfg, tokenizer, process_index, process_count)
    S, R, m = _layout(cfg, global_batch_size, n)
    sources = _open(cfg, cfg.eval_sources)
    encoder, scan = _chat_encoder(cfg, sources, tokenizer, seq_len, label="eval", verbose=p == 0)
    docs = _doc_stream(sources, cfg, [], shuffle=False, repeat=False)
    shard_seeds = _seeds(cfg, seed, S)
    num_batches = num_batches or cfg.eval_batches
    if not num_batches:
        # Counting tokenizes every shard; an eval loop calls this each time, so count once per
        # (config, shape, seed, tokenizer, file versions) in this process.
        files = [path for _, src in sources for path in getattr(src, "source", src).files.paths]
        key = (cfg, seq_len, global_batch_size, seed, fingerprint(tokenizer),
               tuple(_file_stamp(path) for path in files))
        if key not in _EVAL_BATCHES:
            rows_per_shard = [_count(_padded_shard(docs[s::S], tokenizer, encoder, cfg, seq_len,
                                                   shard_seeds[s])[0]) for s in range(S)]
            _EVAL_BATCHES[key] = max(1, math.ceil(max(rows_per_shard) / R))
        num_batches = _EVAL_BATCHES[key]
    shards = [_padded_shard(docs[s::S], tokenizer, encoder, cfg, seq_len, shard_seeds[s])[1].batch(R)
              for s in range(p * m, (p + 1) * m)]
    it = _tracked(iter(_combine_shards(shards, 0, 1, limit=num_batches)))
    it.scan = scan
    return it


def to_global_batch(local_batch: dict[str, Any], mesh: jax.sharding.Mesh,
                    batch_spec: PartitionSpec = PartitionSpec(("data", "fsdp"))) -> dict[str, jax.Array]:
    """This process's rows -> global jax.Arrays sharded by `batch_spec` over `mesh`.

    Process p's rows must land at rows [p*b, (p+1)*b) of the global batch (that is what makes
    the global batch independent of the process count); we check that the mesh puts them there
    rather than silently permuting rows on an unusual device order.
    """
    sharding = NamedSharding(mesh, batch_spec)
    n, p = jax.process_count(), jax.process_index()
    out = {}
    for key, local in local_batch.items():
        local = np.asarray(local)
        b = local.shape[0]
        global_shape = (b * n,) + local.shape[1:]
        rows = [idx[0] for idx in sharding.addressable_devices_indices_map(global_shape).values()]
        lo = min(r.start or 0 for r in rows)
        hi = max(global_shape[0] if r.stop is None else r.stop for r in rows)
        if (lo, hi) != (p * b, (p + 1) * b):
            raise ValueError(
                f"batch sharding {batch_spec} on this mesh gives process {p} global rows "
                f"[{lo}, {hi}) but it holds rows [{p * b}, {(p + 1) * b}): the batch dimension must "
                f"be split across processes in process order (mesh devices ordered by process)")
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def local_rows(x) -> np.ndarray:
    """The inverse of to_global_batch: this process's rows [p*b, (p+1)*b) of a global batch
    array as numpy (one process: the whole array). A multi-host array is gathered first (every
    process calls this in the same order): what comes back is small (tokens, scores), and the
    gather does not depend on how XLA chose to shard an output."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    n, p = jax.process_count(), jax.process_index()
    if x.shape[0] % n:
        raise ValueError(f"a global batch of {x.shape[0]} rows does not split over {n} processes")
    b = x.shape[0] // n
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))[p * b:(p + 1) * b]


def global_mean(local, keep=None) -> float:
    """The mean over every process's rows of a per-row host value (`keep`: the rows counted;
    None: all). Every process calls it in the same order and gets the same number."""
    local = np.asarray(local, np.float64).reshape(-1)
    keep = np.ones(local.shape, bool) if keep is None else np.asarray(keep, bool).reshape(-1)
    sums = np.asarray([np.sum(local[keep]), np.sum(keep)], np.float64)
    if jax.process_count() > 1:   # float64 travels as int32 pairs: jax (x64 off) would round it to float32
        from jax.experimental import multihost_utils
        bits = np.asarray(multihost_utils.process_allgather(sums.view(np.int32)), np.int32)
        sums = np.ascontiguousarray(bits).view(np.float64).reshape(-1, 2).sum(0)
    return float(sums[0] / sums[1]) if sums[1] else float("nan")


def on_every_process(flag: bool) -> bool:
    """Whether `flag` holds on every process (one collective: every process calls it), for a
    choice that must be the same everywhere, such as whether a later collective runs."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))))
