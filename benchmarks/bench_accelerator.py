"""The train step on a GPU/TPU host: tokens/s and MFU against the datasheet bf16 peak, for the 1b
config on every local device (FSDP), per attention implementation. One command, for when an
accelerator is at hand (not run in CI; on CPU it runs too, against the measured GEMM peak).

    python benchmarks/bench_accelerator.py [--model 1b] [--batch-per-device 8] [--seq 2048]
                                           [--attention xla,blockwise,cudnn] [--steps 10]
                                           [--remat dots_no_batch]
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxllm
from jaxllm.data.tokens import synthetic_batches
from jaxllm.objectives import make_clm_loss
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules as rules_lib
from jaxllm.training.metrics import flops_per_token, measure_peak_flops, peak_flops
from jaxllm.training.optim import make_optimizer
from jaxllm.training.setup import init_state
from jaxllm.training.step import make_train_step


def run(model: str, batch: int, seq: int, steps: int, overrides: list[str]):
    cfg = jaxllm.load_config(None, [f"model={model}", f"train.batch_size={batch}", f"train.seq_len={seq}",
                                    "model.compute_dtype=bfloat16", "mesh.preset=fsdp", *overrides])
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices())
    rules = rules_lib.logical_rules(cfg.mesh)
    opt = make_optimizer(cfg.optim, 1000)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, sh = init_state(lambda k: jaxllm.init_params(cfg.model, k),
                               jaxllm.param_logical_axes(cfg.model), opt, rules, mesh, 0)
        step = make_train_step(make_clm_loss(cfg.model), opt, sh)
        it = synthetic_batches(seq_len=seq, global_batch_size=batch, vocab_size=cfg.model.vocab_size, seed=0)
        batches = [jax.device_put(jax.tree.map(jnp.asarray, next(it)), sh.batch) for _ in range(2)]
        t0 = time.perf_counter()
        state, m = step(state, batches[0], None)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, batches[i % 2], None)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tps = batch * seq / dt
    return tps, tps * flops_per_token(cfg.model, seq), compile_s, float(m["loss"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b")
    ap.add_argument("--batch-per-device", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attention", default="")
    ap.add_argument("--remat", default="", help="model.remat for every variant (default: the model config's)")
    args = ap.parse_args()
    devices = jax.devices()
    platform = devices[0].platform
    impls = args.attention.split(",") if args.attention else \
        (["xla", "blockwise", "cudnn"] if platform == "gpu" else ["xla", "blockwise"])
    peak, source = peak_flops(jnp.bfloat16)
    gemm = measure_peak_flops(jnp.bfloat16, n=8192 if platform != "cpu" else 2048)
    print(f"{len(devices)} x {devices[0].device_kind} ({platform}); peak per device {peak / 1e9:,.0f} "
          f"GFLOP/s ({source}); measured bf16 GEMM {gemm / 1e9:,.0f} GFLOP/s")
    batch = args.batch_per_device * len(devices)
    print(f"model {args.model}, bf16, FSDP over {len(devices)} devices, global batch {batch} x {args.seq}")
    print(f"  {'attention':10} {'tokens/s':>12} {'GFLOP/s/dev':>12} {'MFU':>7} {'vs GEMM':>8} {'compile s':>10} loss")
    extra = [f"model.remat={args.remat}"] if args.remat else []
    for impl in impls:
        try:
            tps, flops, compile_s, loss = run(args.model, batch, args.seq, args.steps,
                                              [f"model.attention={impl}", *extra])
        except Exception as e:   # noqa: BLE001 - one variant failing (OOM, no cuDNN) keeps the others
            print(f"  {impl:10} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
            continue
        per_dev = flops / len(devices)
        print(f"  {impl:10} {tps:12,.0f} {per_dev / 1e9:12,.0f} {per_dev / peak:7.1%} {per_dev / gemm:8.1%} "
              f"{compile_s:10.1f} {loss:.3f}")


if __name__ == "__main__":
    main()
