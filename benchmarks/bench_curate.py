"""Curation throughput: the local runner at 1 and 2 processes, MinHash vs datasketch, and the
precision/recall of planted duplicates. Everything is generated and seeded.

    .venv/bin/python benchmarks/bench_curate.py            # 50k documents, a few minutes
    .venv/bin/python benchmarks/bench_curate.py --docs 5000
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

from jaxllm.curate import config, dedup, runner_local, synthetic
from jaxllm.curate import text as T


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def write_corpus(root: pathlib.Path, docs: list[dict], shards: int) -> None:
    root.mkdir(parents=True)
    per = (len(docs) + shards - 1) // shards
    for s in range(shards):
        with open(root / f"shard{s:03d}.jsonl", "w") as f:
            for d in docs[s * per:(s + 1) * per]:
                f.write(json.dumps(d) + "\n")


def planted_precision_recall(docs, truth, cfg) -> tuple[float, float, float]:
    """Dedup alone on the clean documents; returns (precision, recall, docs/s of key hashing)."""
    clean = [d for d in docs if not d["id"].startswith("junk")]
    t0 = time.perf_counter()
    parts = [dedup.dedup_keys([d["text"] for d in clean[i:i + 512]], list(range(i, min(i + 512, len(clean)))),
                              cfg.dedup) for i in range(0, len(clean), 512)]
    keys = dedup.DedupKeys.concat(parts, cfg.dedup.num_bands)
    ex, near, _ = dedup.find_duplicates(keys, cfg.dedup)
    rate = len(clean) / (time.perf_counter() - t0)
    removed = {clean[i]["id"] for i in np.concatenate([ex, near]).tolist()}
    cluster = {d["id"]: truth.get(d["id"], d["id"]) for d in clean}
    sizes: dict[str, int] = {}
    for c in cluster.values():
        sizes[c] = sizes.get(c, 0) + 1
    tp = sum(1 for i in removed if sizes[cluster[i]] > 1)
    return tp / max(len(removed), 1), tp / max(len(truth), 1), rate


def minhash_vs_datasketch(texts: list[str], cfg) -> None:
    norm = [T.normalize(t) for t in texts]
    t0 = time.perf_counter()
    for i in range(0, len(norm), 512):
        dedup.band_keys(dedup.minhash_signatures(norm[i:i + 512], cfg.dedup)[0], cfg.dedup)
    ours = len(norm) / (time.perf_counter() - t0)
    print(f"minhash (numpy, {cfg.dedup.num_bands}x{cfg.dedup.rows_per_band}, 5-grams): {ours:,.0f} docs/s")
    try:
        from datasketch import MinHash
    except ImportError:
        print("datasketch not installed: `.venv/bin/pip install datasketch` to compare")
        return
    n = cfg.dedup.n_grams
    t0 = time.perf_counter()
    for t in norm:
        ws = t.split()
        m = MinHash(num_perm=cfg.dedup.num_bands * cfg.dedup.rows_per_band, seed=1)
        m.update_batch([" ".join(ws[i:i + n]).encode() for i in range(len(ws) - n + 1)])
    theirs = len(norm) / (time.perf_counter() - t0)
    print(f"minhash (datasketch update_batch, same shingles): {theirs:,.0f} docs/s; "
          f"numpy is {ours / theirs:.1f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--words", type=int, default=200, help="words per generated document")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_curate_"))
    try:
        t0 = time.perf_counter()
        docs, truth = synthetic.planted_corpus(a.docs, dup_frac=0.1, exact_frac=0.02, junk_frac=0.05,
                                               n_words=a.words, edit_frac=0.1, seed=a.seed)
        write_corpus(tmp / "raw", docs, a.shards)
        print(f"corpus: {len(docs):,} docs ({len(truth):,} planted copies: 10% near at ~90% word "
              f"overlap, 2% exact; 5% junk) in {a.shards} shards, generated in "
              f"{time.perf_counter() - t0:.1f}s")
        rates, outputs = {}, {}
        for p in a.processes:
            out = tmp / f"out{p}"
            cfg = config.load(None, [f"input.paths=[{tmp}/raw/*.jsonl]", f"output.dir={out}",
                                     f"runner.processes={p}", "report.histograms=false"])
            t0, c0 = time.perf_counter(), _cpu_seconds()
            rep = runner_local.run(cfg, log=lambda *_: None)
            dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            rates[p] = len(docs) / dt
            outputs[p] = {f.name: f.read_bytes() for f in sorted(out.glob("part-*"))}
            # Cores busy on average: on a shared machine, fewer than `p` means other jobs
            # held the CPUs and the wall-clock ratio understates the speed-up.
            print(f"local runner, {p} process(es): {dt:.1f}s, {rates[p]:,.0f} docs/s "
                  f"({rep['output']['docs']:,} kept; {cpu / dt:.2f} cores busy on average, "
                  f"{len(docs) / cpu:,.0f} docs per CPU-second)")
        if 1 in rates and 2 in rates:
            print(f"speed-up 2 vs 1 processes: {rates[2] / rates[1]:.2f}x; identical output: "
                  f"{outputs[1] == outputs[2]}")
        cfg = config.CurateConfig()
        precision, recall, rate = planted_precision_recall(docs, truth, cfg)
        print(f"dedup on planted copies: precision {precision:.3f} recall {recall:.3f} "
              f"(keys {rate:,.0f} docs/s)")
        minhash_vs_datasketch([d["text"] for d in docs[:5000]], cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
