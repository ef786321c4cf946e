"""`jaxllm plan CONFIG`: device memory of a run's train step, before any accelerator is rented.

The step is compiled (never run) for the config's mesh over N simulated CPU devices
(`--xla_force_host_platform_device_count`), and XLA's memory analysis of the per-device
program gives the temporaries: activations saved for the backward pass, gradients and
workspace. Parameters, optimizer state and the batch per device come from their shardings.
The same is done for the config with each memory saver switched on, so one table shows what
each buys. The temporaries are those of XLA's CPU compiler: GPU/TPU fusion differs, so read
them as an estimate (the parameter/optimizer columns are exact). What is planned is the
causal-LM step of the full model (train.objective, LoRA/adapter deltas and RL's extra models are
not modelled: a delta's trainable state is tiny, its frozen base is the params column).

Runs in a child process (the CLI re-executes itself) because the simulated device count must be
set before jax starts.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

SAVERS = {   # name -> overrides that switch it on
    "remat=full": ["model.remat=full"],
    "remat=dots_no_batch": ["model.remat=dots_no_batch"],
    "offload opt state": ["optim.offload_state=true"],
    "bf16 moments": ["optim.moment_dtype=bfloat16"],
    "blockwise attention": ["model.attention=blockwise"],
}


def _per_device_bytes(tree) -> int:
    import jax
    import numpy as np
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total


def measure(config: str | None, overrides: list[str]) -> dict:
    """Per-device bytes of params, optimizer state, batch and compiled temporaries."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jaxllm
    from jaxllm.errors import UserError
    from jaxllm.objectives import make_clm_loss
    from jaxllm.parallel import rules as R
    from jaxllm.parallel.mesh import make_mesh
    from jaxllm.training.optim import make_optimizer
    from jaxllm.training.setup import plan_state
    from jaxllm.training.step import make_train_step

    cfg = jaxllm.load_config(config, list(overrides))
    n = cfg.mesh.devices or len(jax.devices())
    if n > len(jax.devices()):
        raise UserError(f"mesh.devices={n} but the plan simulates {len(jax.devices())} devices "
                        f"(jaxllm plan --devices N)")
    mesh = make_mesh(cfg.mesh, jax.devices()[:n])
    rules = R.logical_rules(cfg.mesh)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    init = lambda key: jaxllm.init_params(cfg.model, key)   # noqa: E731
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract, sh = plan_state(init, jaxllm.param_logical_axes(cfg.model), optimizer, rules, mesh,
                                  offload_opt_state=cfg.optim.offload_state)
        b, t = cfg.train.batch_size, cfg.train.seq_len
        batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh.batch)
                 for k in ("tokens", "positions", "segment_ids", "loss_mask")}
        step = make_train_step(make_clm_loss(cfg.model), optimizer, sh, microbatches=cfg.train.microbatches)
        stats = step.lower(abstract, batch, None).compile().memory_analysis()
    opt = _per_device_bytes(abstract.opt_state)
    out = dict(params=_per_device_bytes(abstract.params), batch=_per_device_bytes(batch),
               opt_state=0 if cfg.optim.offload_state else opt,
               opt_state_host=opt if cfg.optim.offload_state else 0,
               temp=int(stats.temp_size_in_bytes), mesh=dict(mesh.shape), devices=mesh.size,
               tokens=b * t, model=cfg.model)
    out["device_total"] = out["params"] + out["opt_state"] + out["batch"] + out["temp"]
    return out


def report(config: str | None, overrides: list[str], savers: list[str], device_gb: float) -> str:
    rows = [("as configured", measure(config, overrides))]
    notes = []
    import jaxllm
    cfg = jaxllm.load_config(config, list(overrides))
    if cfg.train.objective not in ("clm", "sft") or cfg.lora.r or cfg.adapter.size:
        notes.append(f"note: planned as the full model's causal-LM step; this config's objective "
                     f"({cfg.train.objective}{', LoRA' if cfg.lora.r else ''}"
                     f"{', adapters' if cfg.adapter.size else ''}) is not modelled")
    gc = cfg.optim.grad_compression
    if gc != "none":
        extra = "; int8 also keeps an fp32 error-feedback copy of the params per device" if gc == "int8" else ""
        notes.append(f"note: optim.grad_compression={gc} is not modelled (planned with an fp32 reduction{extra})")
    for name in savers:
        rows.append((name, measure(config, overrides + SAVERS[name])))
    first = rows[0][1]
    m = first["model"]
    big = max(r["device_total"] for _, r in rows) >= 2**30
    unit, scale = ("GiB", 2**30) if big else ("MiB", 2**20)

    def _gib(n: int) -> str:
        return f"{n / scale:,.2f}"
    lines = [f"{config or 'defaults'} {' '.join(overrides)}".strip(),
             f"model d={m.d_model} layers={m.n_layers} vocab={m.vocab_size}; mesh {first['mesh']} "
             f"({first['devices']} devices); global batch {first['tokens']:,} tokens; "
             f"{unit} per device (fits: <= {device_gb:g} GB = {device_gb * 1e9 / 2**30:.1f} GiB)",
             f"  {'variant':<22} {'params':>8} {'opt state':>10} {'host opt':>9} {'batch':>7} "
             f"{'activ.+grads':>13} {'total':>8}  fits"]
    for name, r in rows:
        fits = "yes" if r["device_total"] <= device_gb * 1e9 else "no"   # datasheet GB
        lines.append(f"  {name:<22} {_gib(r['params']):>8} {_gib(r['opt_state']):>10} "
                     f"{_gib(r['opt_state_host']):>9} {_gib(r['batch']):>7} {_gib(r['temp']):>13} "
                     f"{_gib(r['device_total']):>8}  {fits}")
    lines.append("activ.+grads: XLA CPU's compiled temporaries of the causal-LM step of the full model (an "
                 "estimate for GPU/TPU); savers are each applied alone on top of the config")
    return "\n".join(lines + notes)


def run_in_child(config: str | None, overrides: list[str], devices: int, savers: list[str],
                 device_gb: float) -> int:
    """Re-execute with `devices` simulated CPU devices (jax reads the flag once, at start-up)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "jaxllm.training.plan", "--device-gb", str(device_gb),
           "--savers", ",".join(savers)] + ([config] if config else ["-"]) + list(overrides)
    return subprocess.run(cmd, env=env).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxllm.training.plan")
    ap.add_argument("--device-gb", type=float, default=80.0)
    ap.add_argument("--savers", default="")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from jaxllm.errors import UserError
    try:
        print(report(None if args.config == "-" else args.config, args.overrides,
                     [s for s in args.savers.split(",") if s], args.device_gb))
    except UserError as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
