"""model.scan_layers: the train step with layers under lax.scan vs unrolled, interleaved in one
run (ratios only; absolute times drift on a shared machine), plus compile times.

    .venv/bin/python benchmarks/bench_layers.py [--model 25m] [--rounds 5] [--steps 3]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import flax.linen as nn
import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_train import build  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="25m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = ap.parse_args()
    variants = {}
    for dtype in ("float32", "bfloat16"):
        for scan in ("true", "false"):
            name = f"{dtype} scan_layers={scan}"
            cfg, mesh, rules, state, step, batches = build(
                args.model, args.batch, args.seq, [f"model.compute_dtype={dtype}", f"model.scan_layers={scan}"])
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                t0 = time.perf_counter()
                state, m = step(state, batches[0], None)
                jax.block_until_ready(m)
            variants[name] = dict(mesh=mesh, rules=rules, state=state, step=step, batches=batches,
                                  compile=time.perf_counter() - t0, times=[])
    for _ in range(args.rounds):   # interleaved: every variant sees the same machine load
        for v in variants.values():
            with jax.set_mesh(v["mesh"]), nn.logical_axis_rules(v["rules"]):
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    v["state"], m = v["step"](v["state"], v["batches"][i % 2], None)
                    jax.block_until_ready(m)
                    v["times"].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    print(f"{args.model}, batch {args.batch} x {args.seq}, {args.rounds} interleaved rounds of "
          f"{args.steps} steps; tokens/s median (min-max), compile s")
    base = {}
    for name, v in variants.items():
        tps = sorted(tokens / t for t in v["times"])
        med = statistics.median(tps)
        dtype = name.split()[0]
        base.setdefault(dtype, med)
        print(f"  {name:28} {med:8,.0f} ({tps[0]:,.0f}-{tps[-1]:,.0f})  x{med / base[dtype]:.2f}  "
              f"compile {v['compile']:.1f}")


if __name__ == "__main__":
    main()
