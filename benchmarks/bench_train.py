"""Train-step throughput and MFU on this machine, plus compile time vs depth.

MFU = model FLOPs/s (training.metrics.flops_per_token) / the peak of a large jnp.dot measured in
this same process (fp32 and bf16-operand peaks both measured), so the ratio is comparable
across runs even though absolute times on a shared machine are not.

    .venv/bin/python benchmarks/bench_train.py [--steps 10] [--models tiny,25m]
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxllm
from jaxllm import host_alloc, xla_flags
from jaxllm.data.tokens import synthetic_batches
from jaxllm.objectives import make_clm_loss
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules as rules_lib
from jaxllm.training.metrics import flops_per_token, measure_peak_flops
from jaxllm.training.optim import make_optimizer
from jaxllm.training.setup import init_state
from jaxllm.training.step import make_train_step


def build(model: str, batch: int, seq: int, overrides=()):
    cfg = jaxllm.load_config(None, [f"model={model}", f"train.batch_size={batch}",
                                    f"train.seq_len={seq}", "mesh.devices=1", *overrides])
    line = xla_flags.apply(cfg.model)      # as `jaxllm train` does, before the backend starts
    if line:
        print(line, flush=True)
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    rules = rules_lib.logical_rules(cfg.mesh)
    opt = make_optimizer(cfg.optim, 1000)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, sh = init_state(lambda k: jaxllm.init_params(cfg.model, k),
                               jaxllm.param_logical_axes(cfg.model), opt, rules, mesh, 0)
        step = make_train_step(make_clm_loss(cfg.model), opt, sh)
    it = synthetic_batches(seq_len=seq, global_batch_size=batch, vocab_size=cfg.model.vocab_size, seed=0)
    batches = [jax.tree.map(jnp.asarray, next(it)) for _ in range(2)]
    return cfg, mesh, rules, state, step, batches


def throughput(model, batch, seq, steps, overrides=()):
    cfg, mesh, rules, state, step, batches = build(model, batch, seq, overrides)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
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
    dt = sorted(times)[len(times) // 2]  # median: robust to the shared machine's noise
    tps = batch * seq / dt
    return cfg, tps, tps * flops_per_token(cfg.model, seq), compile_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--models", default="tiny,25m")
    args = ap.parse_args()
    print(host_alloc.keep_pages())   # as `jaxllm train` does (JAXLLM_HOST_ALLOC=default: off)
    peak32 = measure_peak_flops(jnp.float32, n=2048)
    peak16 = measure_peak_flops(jnp.bfloat16, n=2048)
    print(f"device: {jax.devices()[0].device_kind}; measured matmul peak: fp32 {peak32 / 1e9:.0f} "
          f"GFLOP/s, bf16 operands/fp32 accumulate {peak16 / 1e9:.0f} GFLOP/s")
    print(f"{'model':8} {'compute':9} {'batch x seq':12} {'tokens/s':>10} {'GFLOP/s':>9} {'MFU':>6}")
    shapes = {"tiny": (16, 128), "25m": (8, 256)}
    for model in args.models.split(","):
        b, t = shapes.get(model, (8, 256))
        for dtype, peak in (("float32", peak32), ("bfloat16", peak16)):
            _, tps, flops, _ = throughput(model, b, t, args.steps, [f"model.compute_dtype={dtype}"])
            print(f"{model:8} {dtype:9} {f'{b} x {t}':12} {tps:10,.0f} {flops / 1e9:9.1f} {flops / peak:6.1%}")
    print("compile time of the train step (25m geometry, fp32):")
    for layers in (2, 4, 8):
        _, _, _, c = throughput("25m", 2, 64, 1, [f"model.n_layers={layers}"])
        print(f"  n_layers={layers}: {c:.1f} s")


if __name__ == "__main__":
    main()
