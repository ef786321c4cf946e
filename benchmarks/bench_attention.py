"""Attention: memory vs sequence length (compiled memory analysis, nothing allocated), and the
train step's speed with the reference (xla) vs blockwise attention, interleaved in one run.

    .venv/bin/python benchmarks/bench_attention.py memory [--seqs 1024,2048,4096,8192,16384]
    .venv/bin/python benchmarks/bench_attention.py step [--model 25m] [--seq 256] [--blocks 128,256]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_train import build  # noqa: E402

from jaxllm.model.attention import attention  # noqa: E402


def grad_temp_bytes(impl: str, t: int, heads: int, kv_heads: int, head_dim: int, block: int) -> int:
    """Temporary bytes of value-and-grad of one attention call at batch 1, fp32 (compile only)."""
    q = jax.ShapeDtypeStruct((1, t, heads, head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, kv_heads, head_dim), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, implementation=impl, block=block) ** 2)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fn.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes


def memory(args):
    seqs = [int(s) for s in args.seqs.split(",")]
    print(f"attention value+grad, batch 1, {args.heads} heads / {args.kv_heads} kv heads x "
          f"{args.head_dim}, fp32, block {args.block}: compiled temp memory (MiB)")
    print(f"  {'seq':>6} {'xla':>10} {'blockwise':>10}")
    rows = {}
    for t in seqs:
        rows[t] = [grad_temp_bytes(impl, t, args.heads, args.kv_heads, args.head_dim, args.block)
                   for impl in ("xla", "blockwise")]
        print(f"  {t:>6} {rows[t][0] / 2**20:>10,.1f} {rows[t][1] / 2**20:>10,.1f}")
    lo, hi = seqs[0], seqs[-1]
    print(f"  growth {lo} -> {hi} ({hi // lo}x the length): xla x{rows[hi][0] / rows[lo][0]:.1f}, "
          f"blockwise x{rows[hi][1] / rows[lo][1]:.1f}")


def step(args):
    variants = {}
    for dtype in args.dtypes.split(","):
        names = [("xla", [])] + [(f"blockwise {b}", ["model.attention=blockwise", f"model.attention_block={b}"])
                                 for b in args.blocks.split(",")]
        for label, overrides in names:
            cfg, mesh, rules, state, fn, batches = build(
                args.model, args.batch, args.seq,
                [f"model.compute_dtype={dtype}", f"model.scan_layers={args.scan_layers}"] + overrides)
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                t0 = time.perf_counter()
                state, m = fn(state, batches[0], None)
                jax.block_until_ready(m)
            variants[f"{dtype} {label}"] = dict(mesh=mesh, rules=rules, state=state, step=fn,
                                                batches=batches, compile=time.perf_counter() - t0,
                                                times=[], dtype=dtype)
    for _ in range(args.rounds):   # interleaved: every variant sees the same machine load
        for v in variants.values():
            with jax.set_mesh(v["mesh"]), nn.logical_axis_rules(v["rules"]):
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    v["state"], m = v["step"](v["state"], v["batches"][i % 2], None)
                    jax.block_until_ready(m)
                    v["times"].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    print(f"{args.model}, batch {args.batch} x {args.seq}, scan_layers={args.scan_layers}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps; tokens/s median (min-max), compile s")
    base = {}
    for name, v in variants.items():
        tps = sorted(tokens / t for t in v["times"])
        med = statistics.median(tps)
        base.setdefault(v["dtype"], med)
        print(f"  {name:28} {med:8,.0f} ({tps[0]:,.0f}-{tps[-1]:,.0f})  x{med / base[v['dtype']]:.2f}  "
              f"compile {v['compile']:.1f}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    m.add_argument("--heads", type=int, default=12)
    m.add_argument("--kv-heads", type=int, default=4)
    m.add_argument("--head-dim", type=int, default=64)
    m.add_argument("--block", type=int, default=512)
    s = sub.add_parser("step")
    s.add_argument("--model", default="25m")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--blocks", default="128,256")
    s.add_argument("--dtypes", default="float32,bfloat16")
    s.add_argument("--scan-layers", default="false")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = ap.parse_args()
    memory(args) if args.what == "memory" else step(args)


if __name__ == "__main__":
    main()
