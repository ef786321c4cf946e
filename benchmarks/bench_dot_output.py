"""model.dot_output=compute and its XLA flags: an interleaved A/B of the bf16 train step.

XLA flags act on a whole process, so each variant runs in a resident worker process of its own
(compiled once); every round asks each worker for `--steps` steps in turn, so the machine's drift
hits all variants alike. Variants (`--variants`, comma-separated; default fp32,bf16,compute,compute-onednn):

  fp32                  model.compute_dtype=float32 (the reference for CPUs without bf16 hardware)
  bf16                  model.compute_dtype=bfloat16, fp32-output dots, XLA's default flags
                        (YNNPACK GEMMs)
  compute               bf16 + model.dot_output=compute with what `jaxllm train` sets: on a CPU
                        with AMX the flags of jaxllm/xla_flags.py (dots to oneDNN's AMX kernel,
                        reductions to YNNPACK), elsewhere none
  compute-onednn        the same with those flags forced, whatever the CPU
  ynn-off               compute-onednn with YNNPACK's fusions off altogether (reductions fall to
                        XLA's own loops): what the flags were before they kept YNNPACK's reductions
  fp32-onednn           fp32 under the oneDNN flags (fp32 dots to oneDNN's brgemm)
  fp32-ynn-off          fp32 with YNNPACK's fusions off (dots to XLA's Eigen GEMMs)

    python benchmarks/bench_dot_output.py [--model 25m] [--rounds 8] [--steps 3] [--variants ...] [--override k=v ...]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

from jaxllm import xla_flags

BENCH = pathlib.Path(__file__).resolve().parent
WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
from jaxllm import host_alloc
host_alloc.keep_pages()
import flax.linen as nn, jax
from bench_train import build
cfg, mesh, rules, state, step, batches = build(sys.argv[2], 8, 256, json.loads(sys.argv[1]))
i = 0
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            state, m = step(state, batches[i % 2], None)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
            i += 1
        print("@@" + json.dumps({"times": times, "loss": float(m["loss"]), "jax": jax.__version__}), flush=True)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="25m")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default="fp32,bf16,compute,compute-onednn")
    ap.add_argument("--override", nargs="*", default=["model.scan_layers=false"])
    args = ap.parse_args()
    base = ["model.compute_dtype=bfloat16", *args.override]
    compute = [*base, "model.dot_output=compute"]
    onednn = " ".join(f"{k}={v}" for k, v in xla_flags.AMX_DOTS.items())
    fp32 = ["model.compute_dtype=float32", *args.override]
    known = {"fp32": ("", fp32), "bf16": ("", base),
             "compute": ("", compute), "compute-onednn": (onednn, compute),
             "ynn-off": ("--xla_cpu_experimental_onednn_custom_call=true "
                         "--xla_cpu_experimental_ynn_fusion_type=", compute),
             "fp32-onednn": (onednn, fp32), "fp32-ynn-off": ("--xla_cpu_experimental_ynn_fusion_type=", fp32)}
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in known]:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(known)}")
    if "bf16" not in names:
        ap.error("--variants must include bf16 (the ratios are against it)")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    variants = {n: known[n] for n in names}
    amx = "amx_bf16" in xla_flags.cpu_features()
    workers = {}
    for name, (flags, overrides) in variants.items():
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        if flags:
            env["XLA_FLAGS"] = flags
        workers[name] = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(overrides), args.model, str(BENCH)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(name, steps):
        w = workers[name]
        w.stdin.write(f"{steps}\n")
        w.stdin.flush()
        for line in w.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker {name!r} exited (code {w.wait()})")

    try:
        for name in workers:          # compile and warm up, one worker at a time
            ask(name, 2)
        rates = {k: [] for k in workers}
        loss = {}
        for _ in range(args.rounds):
            for name in workers:
                out = ask(name, args.steps)
                rates[name].append(8 * 256 / statistics.median(out["times"]))
                loss[name] = out["loss"]
                jax_version = out["jax"]
    finally:
        for w in workers.values():
            w.stdin.close()
            w.wait()
    ref = statistics.median(rates["bf16"])
    print(f"jax {jax_version}, CPU {'with' if amx else 'without'} AMX (amx_bf16)")
    print(f"{args.model}, batch 8 x 256, {' '.join(args.override)}; {args.rounds} interleaved rounds of "
          f"{args.steps} steps, tokens/s (median of each round's median)")
    print("| variant | tokens/s | spread | vs bf16 | loss after the last step |")
    print("|---|---|---|---|---|")
    for name, rs in rates.items():
        med = statistics.median(rs)
        print(f"| {name} | {med:,.0f} | {min(rs):,.0f}-{max(rs):,.0f} | {med / ref:.2f}x | {loss[name]:.5f} |")


if __name__ == "__main__":
    main()
