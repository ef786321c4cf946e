"""Local runner: a process pool over input shards, streaming, memory bounded per shard.

Phase 1 (parallel, one task per shard): read, run the per-document stages, spool survivors
  to <work>/spool-<i>.jsonl and their dedup keys to <work>/keys-<i>.npz.
Phase 2 (driver): load the keys only (~130 bytes a document), find exact and near
  duplicates, save the order keys to drop.
Phase 3 (parallel): copy each spool to its output shard, skipping the dropped documents.
Shards are written to a fresh directory inside output.dir and renamed into place at the end;
the only files a run removes from output.dir are earlier shards named part-NNNNN-of-NNNNN.
Documents are streamed; only `KEY_BATCH` texts are held at a time for vectorised hashing.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np

from jaxllm.curate import checks, dedup, io, report
from jaxllm.curate.config import CurateConfig
from jaxllm.curate.report import Stats
from jaxllm.curate.stages import Curator, keys_for
from jaxllm.curate.text import words

KEY_BATCH = 512
_curator: Curator | None = None   # one per worker process, built by _init


def _init(cfg: CurateConfig) -> None:
    global _curator
    _curator = Curator(cfg)


def _filter_shard(task) -> tuple[Stats, str, str]:
    cfg, work, i, path = task
    spool, keys_path = f"{work}/spool-{i:05d}.jsonl", f"{work}/keys-{i:05d}.npz"
    stats = Stats()
    try:
        parts = _filter_to_spool(cfg, i, path, spool, stats)
    except io.BadShardError as e:
        if not cfg.input.skip_bad_shards:
            raise
        # Nothing of a damaged file goes on: not its records read before the damage, not
        # their counts. The report names the file instead.
        stats = Stats()
        stats.skip(path, e.cause)
        open(spool, "wb").close()
        parts = []
    k = dedup.DedupKeys.concat(parts, cfg.dedup.num_bands)
    np.savez(keys_path, order=k.order, exact=k.exact, bands=k.bands, has_sig=k.has_sig)
    return stats, spool, keys_path


def _filter_to_spool(cfg: CurateConfig, i: int, path: str, spool: str, stats: Stats
                     ) -> list[dedup.DedupKeys]:
    parts, batch = [], []
    with open(spool, "wb") as out:
        for rec in io.read_shard(path, i, cfg.input, stats.counts):
            kept = _curator.process(rec, stats)
            if kept is None:
                continue
            out.write(json.dumps({"order": kept.order, **kept.to_json()}, ensure_ascii=False)
                      .encode("utf-8") + b"\n")
            batch.append(kept)
            if len(batch) == KEY_BATCH:
                parts.append(keys_for(batch, cfg))
                batch = []
    if batch:
        parts.append(keys_for(batch, cfg))
    return parts


def _write_shard(task) -> Stats:
    cfg, work, stage, i, n_shards = task
    drop = np.load(f"{work}/drop.npy")
    stats = Stats()

    def survivors():
        with open(f"{work}/spool-{i:05d}.jsonl", "rb") as f:
            for line in f:
                d = json.loads(line)
                order = d.pop("order")
                j = np.searchsorted(drop, order)
                if j < drop.size and drop[j] == order:
                    continue
                stats.observe("words_output", len(words(d["text"])))
                yield d

    path = os.path.join(stage, io.output_name(i, n_shards, cfg.output))
    stats.add("output/docs", io.write_shard(path, survivors(), cfg.output))
    return stats


def run(cfg: CurateConfig, log=print) -> dict:
    """Curate cfg.input into cfg.output.dir; returns the report (also written as report.json)."""
    t0 = time.time()
    shards = io.list_shards(cfg.input)
    checks.preflight(cfg, shards)
    out = cfg.output.dir
    n = len(shards)
    procs = min(cfg.runner.processes, n)
    # Set up once here first: a missing list file, model or package then fails now, with its
    # message, rather than in the pool's initializer (which would respawn workers forever).
    _init(cfg)
    os.makedirs(out, exist_ok=True)
    # New shards are written to a fresh directory inside output.dir and renamed into place at
    # the end, so a failed run leaves an earlier run's output whole.
    stage = tempfile.mkdtemp(prefix=".curate-", dir=out)
    work = cfg.runner.work_dir or stage
    os.makedirs(work, exist_ok=True)
    pool = None
    if procs > 1:
        global _curator
        _curator = None   # the workers build their own; the driver need not hold one
        # spawn, not fork: workers must not inherit the parent's threads (JAX, BLAS) or locks.
        pool = multiprocessing.get_context("spawn").Pool(procs, initializer=_init, initargs=(cfg,))
        pmap = lambda f, xs: pool.map(f, xs, chunksize=1)  # noqa: E731
    else:
        pmap = lambda f, xs: list(map(f, xs))  # noqa: E731
    try:
        results = pmap(_filter_shard, [(cfg, work, i, p) for i, p in enumerate(shards)])
        stats = Stats.merged(r[0] for r in results)
        for path, why in stats.skipped:
            log(f"curate: skipped input {path} ({why}) as input.skip_bad_shards=true asks")
        log(f"curate: filtered {n} shards in {time.time() - t0:.1f}s")
        parts = []
        for _, _, kp in results:
            z = np.load(kp)
            parts.append(dedup.DedupKeys(z["order"], z["exact"], z["bands"], z["has_sig"]))
        keys = dedup.DedupKeys.concat(parts, cfg.dedup.num_bands)
        removed_exact, removed_near, clusters = dedup.find_duplicates(keys, cfg.dedup)
        report.count_dedup(stats, keys.order.size, removed_exact.size, removed_near.size, cfg)
        np.save(f"{work}/drop.npy", np.sort(np.concatenate([removed_exact, removed_near])))
        for s in pmap(_write_shard, [(cfg, work, stage, i, n) for i in range(n)]):
            stats.merge(s)
        rep = report.summary(stats, n, stats.counts["output/docs"], clusters)
        _publish(stage, out, log)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        shutil.rmtree(stage, ignore_errors=True)
    report.write(out, rep, cfg.report.histograms, io.local_open)
    log(f"curate: {rep['input']['records']} records -> {rep['output']['docs']} documents "
        f"in {time.time() - t0:.1f}s; report in {out}/report.json")
    return rep


def _publish(stage: str, out: str, log) -> None:
    """Replace the shards of an earlier run (only names this runner makes) with the new ones."""
    stale = sorted(name for name in os.listdir(out) if io.is_output_name(name))
    for name in stale:
        os.remove(os.path.join(out, name))
    if stale:
        log(f"curate: removed {len(stale)} part-*-of-* shards of an earlier run from {out}")
    for name in sorted(os.listdir(stage)):
        if io.is_output_name(name):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
