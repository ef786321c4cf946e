"""Where a train step's time goes: XLA op time by op kind, from a JAX profiler trace.

Runs a few steps of a config's train step (one device, AdamW) under jax.profiler, reads the
Perfetto trace it writes, and sums the duration of every XLA op event on XLA's CPU worker
threads, grouped by op name without its numeric suffix ("ynn_fusion.12" -> "ynn_fusion").
GEMMs are the `ynn_fusion` rows on jax 0.12 (YNNPACK), `onednn$matmul` with model.dot_output=compute
(oneDNN, under the flags jaxllm/xla_flags.py sets) and `dot`/`*_dot_fusion` rows on 0.10.
Shares are of summed op time across threads; on a shared machine absolute times vary from run
to run, shares much less.

    .venv/bin/python benchmarks/profile_step.py [--model 25m] [--override model.compute_dtype=bfloat16 ...]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile

import flax.linen as nn
import jax
from bench_train import build

from jaxllm import host_alloc

# Events that wrap or wait for ops rather than being ops themselves.
_NOT_OPS = ("ThunkExecutor", "ThreadPool", "wait for completion")


def op_times(trace_file: pathlib.Path) -> collections.Counter:
    """Summed microseconds per op kind over XLA's worker threads."""
    trace = json.load(gzip.open(trace_file))
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out: collections.Counter = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") != "X" or not threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA"):
            continue
        if any(s in e["name"] for s in _NOT_OPS):
            continue
        name = e["name"]
        # oneDNN dots (model.dot_output=compute with its XLA flags): "custom-call.79.clone__onednn$matmul"
        out["onednn$matmul" if "onednn$matmul" in name else re.sub(r"[.\d]+$", "", name)] += e["dur"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="25m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--override", nargs="*", default=["model.compute_dtype=bfloat16", "model.scan_layers=false"])
    args = ap.parse_args()
    print(host_alloc.keep_pages())   # as `jaxllm train` does (JAXLLM_HOST_ALLOC=default: off)
    cfg, mesh, rules, state, step, batches = build(args.model, args.batch, args.seq, args.override)
    with tempfile.TemporaryDirectory() as d, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for i in range(2):
            state, m = step(state, batches[i % 2], None)
            jax.block_until_ready(m)
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for i in range(args.steps):
            state, m = step(state, batches[i % 2], None)
            jax.block_until_ready(m)
        jax.profiler.stop_trace()
        files = sorted(pathlib.Path(d).rglob("*.trace.json.gz"))
        if not files:
            raise SystemExit(f"the profiler wrote no Perfetto trace under {d}")
        times = op_times(files[-1])
    total = sum(times.values())
    if not total:
        raise SystemExit("no XLA op events on tf_XLA* threads in the trace (a jax whose profiler "
                         "names its threads differently?)")
    print(f"jax {jax.__version__}, {args.model}, batch {args.batch} x {args.seq}, {' '.join(args.override)}: "
          f"{total / args.steps / 1e3:.0f} ms of op time per step (summed over threads)")
    print(f"{'op':40s} {'ms/step':>9s} {'share':>6s}")
    for name, us in times.most_common(args.top):
        print(f"{name:40s} {us / args.steps / 1e3:9.1f} {us / total:6.1%}")


if __name__ == "__main__":
    main()
