"""Fine-tuning memory: full fine-tuning vs LoRA (over an fp32, int8 or NF4 base: QLoRA) vs
bottleneck adapters.

1. From shapes only (jax.eval_shape, nothing allocated), for the 125m and 1b configs: the
   trainable parameters, their gradients and the optimizer state (AdamW: two fp32 moments per
   trainable parameter), plus the frozen base a delta needs beside them.
2. Measured on 125m: peak RSS (resource.getrusage ru_maxrss) of a short CPU training run of
   each method, each in its own subprocess so the peaks do not mix; the RSS after the base
   model and the state exist (before the first step) is printed beside it.

    .venv/bin/python benchmarks/bench_finetune_memory.py [--steps 3] [--batch 2] [--seq 128]
                                                          [--rank 8] [--adapter-size 64] [--no-measure]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np

import jaxllm
from jaxllm.config import AdapterConfig, LoraConfig, OptimConfig
from jaxllm.model import adapter, lora, quant
from jaxllm.model.api import param_logical_axes, param_shapes
from jaxllm.training.optim import make_optimizer

METHODS = ("full", "lora", "qlora-int8", "qlora-nf4", "adapter")


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def nparams(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def method_parts(method: str, rank: int, adapter_size: int):
    """(delta module or None, its config)."""
    if method.startswith("qlora-"):
        return lora, LoraConfig(r=rank, alpha=2.0 * rank, quantize_base=method.split("-")[1])
    if method == "lora":
        return lora, LoraConfig(r=rank, alpha=2.0 * rank)
    if method == "adapter":
        return adapter, AdapterConfig(size=adapter_size)
    return None, None


def label(method: str, rank: int, adapter_size: int) -> str:
    return {"full": "full", "lora": f"lora r={rank}", "qlora-int8": f"lora r={rank} int8 base",
            "qlora-nf4": f"lora r={rank} nf4 base", "adapter": f"adapter size={adapter_size}"}[method]


def frozen_shapes(base, dcfg):
    """The frozen base as a delta run keeps it: as is, or quantized (QLoRA)."""
    kind = getattr(dcfg, "quantize_base", "none")
    if kind == "none":
        return base
    return jax.eval_shape(lambda p: quant.quantize_tree(p, kind, dcfg.quantize_block), base)


def shapes_table(models, rank: int, adapter_size: int) -> list[str]:
    optimizer = make_optimizer(OptimConfig(), 1000)
    lines = [f"{'model':<6} {'method':<18} {'trainable':>13} {'train MiB':>10} {'grads MiB':>10} "
             f"{'opt MiB':>9} {'frozen MiB':>11} {'sum MiB':>9} {'train+grad+opt vs full':>23}"]
    for name in models:
        cfg = jaxllm.load_config(None, [f"model={name}"]).model
        base = param_shapes(cfg)
        full_dynamic = None
        for method in METHODS:
            module, dcfg = method_parts(method, rank, adapter_size)
            if module is None:
                trainable, frozen = base, {}
            else:
                trainable = jax.eval_shape(lambda k: module.init_delta(base, dcfg, k), jax.random.key(0))
                frozen = frozen_shapes(base, dcfg)
            opt = jax.eval_shape(optimizer.init, trainable)
            t, o, f = nbytes(trainable), nbytes(opt), nbytes(frozen)
            dynamic = 2 * t + o                     # params + grads (param dtype) + optimizer state
            full_dynamic = full_dynamic or dynamic
            mib = [x / 2**20 for x in (t, t, o, f, dynamic + f)]
            lines.append(f"{name:<6} {label(method, rank, adapter_size):<18} {nparams(trainable):>13,} "
                         + "{:>10.1f} {:>10.1f} {:>9.1f} {:>11.1f} {:>9.1f}".format(*mib)
                         + f" {dynamic / full_dynamic:>23.4f}")
    return lines


# ------------------------------------------------------------------ one measured run (child)
def child(method: str, model: str, steps: int, batch: int, seq: int, rank: int, adapter_size: int) -> dict:
    from jaxllm.data.tokens import synthetic_batches
    from jaxllm.objectives import make_clm_loss
    from jaxllm.parallel import rules as R
    from jaxllm.training.setup import make_state, plan_state
    from jaxllm.training.step import make_train_step

    cfg = jaxllm.load_config(None, [f"model={model}", "mesh.devices=1"])
    mcfg = cfg.model
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = R.logical_rules(cfg.mesh)
    optimizer = make_optimizer(cfg.optim, steps)
    module, dcfg = method_parts(method, rank, adapter_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if module is None:
            init_fn, specs = (lambda k: jaxllm.init_params(mcfg, k)), param_logical_axes(mcfg)
            _, sh = plan_state(init_fn, specs, optimizer, rules, mesh)
            state, frozen, merge = make_state(init_fn, optimizer, sh, seed=0), None, None
        else:
            shapes = param_shapes(mcfg)
            init_fn = lambda k: module.init_delta(shapes, dcfg, k)      # noqa: E731
            fshapes = frozen_shapes(shapes, dcfg)
            fspecs = param_logical_axes(mcfg)
            kind = getattr(dcfg, "quantize_base", "none")
            if kind != "none":
                fspecs = quant.logical_axes(fspecs, fshapes)
            _, sh = plan_state(init_fn, module.delta_logical_axes(mcfg, dcfg), optimizer, rules, mesh,
                               frozen_specs=fspecs, frozen_shapes=fshapes)
            state = make_state(init_fn, optimizer, sh, seed=0)

            def make_base(k):
                p = jaxllm.init_params(mcfg, k)
                return p if kind == "none" else quant.quantize_tree(p, kind, dcfg.quantize_block)
            frozen = jax.jit(make_base, out_shardings=sh.frozen)(jax.random.key(1))
            merge = module.make_merge(dcfg)
        kwargs = {} if merge is None else {"merge": merge}
        step = make_train_step(make_clm_loss(mcfg), optimizer, sh, **kwargs)
        jax.block_until_ready((state, frozen))
        rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        it = synthetic_batches(seq_len=seq, global_batch_size=batch, vocab_size=mcfg.vocab_size, seed=0)
        batches = [jax.device_put(next(it), sh.batch) for _ in range(steps)]
        compiled = step.lower(state, batches[0], frozen).compile()
        # XLA's own account of the step's buffers (temporaries: activations, gradients, casts)
        mem = compiled.memory_analysis()
        losses, times = [], []
        for batch_ in batches:
            t0 = time.perf_counter()
            state, m = compiled(state, batch_, frozen)
            losses.append(float(m["loss"]))
            times.append(time.perf_counter() - t0)
    return {"method": method, "rss_ready_mib": rss_ready,
            "xla_temp_mib": getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "losses": losses, "step_s": sorted(times)[len(times) // 2]}


def measure(args) -> list[str]:
    lines = [f"measured on {args.measure_model}, CPU, {args.steps} steps of batch {args.batch} x seq "
             f"{args.seq} (each method in its own process)",
             f"{'method':<18} {'RSS ready MiB':>14} {'XLA temp MiB':>13} {'peak RSS MiB':>13} "
             f"{'peak vs full':>13} {'step s':>7} {'losses':>24}"]
    full_peak = None
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
               "--adapter-size", str(args.adapter_size), "--measure-model", args.measure_model]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{method} run failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        full_peak = full_peak or r["peak_rss_mib"]
        losses = " ".join(f"{x:.3f}" for x in r["losses"])
        lines.append(f"{label(method, args.rank, args.adapter_size):<18} {r['rss_ready_mib']:>14.0f} "
                     f"{r['xla_temp_mib']:>13.0f} {r['peak_rss_mib']:>13.0f} "
                     f"{r['peak_rss_mib'] / full_peak:>13.2f} {r['step_s']:>7.2f} {losses:>24}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="125m,1b")
    ap.add_argument("--measure-model", default="125m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--adapter-size", type=int, default=64)
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.measure_model, args.steps, args.batch, args.seq,
                               args.rank, args.adapter_size)))
        return
    print("from shapes (jax.eval_shape), AdamW: params and grads in param dtype, 2 fp32 moments; "
          "LoRA on q,k,v,o,gate,up,down; adapters after attention and MLP")
    print("\n".join(shapes_table(args.models.split(","), args.rank, args.adapter_size)))
    if not args.no_measure:
        print()
        print("\n".join(measure(args)))


if __name__ == "__main__":
    main()
