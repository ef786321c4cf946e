"""Decoding throughput: the KV cache (jaxllm.model.generate) vs recomputing the whole forward for
every new token, in the same process, on random-init models of configs/model/*.yaml.

    .venv/bin/python benchmarks/bench_generate.py [--models tiny,25m,125m] [--batches 1,8]
                                                  [--new 64,256] [--prompt 32]

cached      one generate() call (prefill + jitted while_loop, greedy, no eos so every row runs
            all N steps), timed after a compile run; decode tok/s = B*N / (total - prefill).
recompute   greedy by jaxllm.forward on the growing sequence (right-padded to a multiple of 64,
            causal, so one compiled shape per 64-token bucket). Each step costs the forward of
            its bucket, so one forward per bucket is timed (median of --repeats) and the N steps'
            time is the sum over steps of their bucket's time: the recompute rows are
            EXTRAPOLATED per token from these timings, not run token by token.
prefill     B*P prompt tokens / the time of one prefill pass.
cache       bytes of k and v: 2 * layers * B * (P + N) * kv_heads * head_dim * dtype size.
Both paths get the matrices pre-cast to the compute dtype once (generate does this itself).
Times on a shared CPU swing from run to run; compare the ratio within one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxllm
from jaxllm.model import generate as G

BUCKET = 64


def model_cfg(name: str) -> jaxllm.ModelConfig:
    return jaxllm.load_config(None, [f"model={name}"]).model


def timed(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench_case(cfg, params, batch: int, prompt: int, new: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    mask = np.ones_like(prompts)
    key = jax.random.key(0)

    def run_cached():
        return G.generate(params, prompts, cfg, max_new_tokens=new, key=key, eos_id=None, pad_id=0).tokens
    timed(run_cached)                                      # compile
    total = min(timed(run_cached) for _ in range(max(1, repeats - 1)))
    cparams = G._cast_jit(params, cfg)
    prefill = jax.jit(G.prefill, static_argnames=("cfg", "max_len"))
    args = (cparams, jnp.asarray(prompts), jnp.asarray(mask))
    timed(lambda: prefill(*args, cfg, prompt + new))
    t_prefill = min(timed(lambda: prefill(*args, cfg, prompt + new)) for _ in range(repeats))

    @jax.jit
    def next_token(p, buf, last):                      # buf (B, W): full forward, argmax at `last`
        return jnp.argmax(jaxllm.forward(p, buf, cfg)[:, last], axis=-1)
    per_bucket = {}
    for length in range(prompt, prompt + new):
        w = -(-(length) // BUCKET) * BUCKET
        if w not in per_bucket:
            buf = jnp.zeros((batch, w), jnp.int32).at[:, :prompt].set(prompts)
            timed(next_token, cparams, buf, length - 1)    # compile
            per_bucket[w] = float(np.median([timed(next_token, cparams, buf, length - 1)
                                             for _ in range(repeats)]))
    t_recompute = sum(per_bucket[-(-length // BUCKET) * BUCKET] for length in range(prompt, prompt + new))
    decode = max(total - t_prefill, 1e-9)
    itemsize = jnp.dtype(cfg.compute_dtype).itemsize
    cache = 2 * cfg.n_layers * batch * (prompt + new) * cfg.n_kv_heads * cfg.dim_per_head * itemsize
    return {"cached": batch * new / decode, "recompute": batch * new / t_recompute,
            "prefill": batch * prompt / t_prefill, "cache_bytes": cache, "buckets": len(per_bucket)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,25m,125m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", default="64,256")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compute-dtypes", default="config",
                    help="comma list of model.compute_dtype values to run each model at; 'config' = "
                         "the model config's own")
    a = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; prompt {a.prompt} tokens; greedy; "
          f"recompute extrapolated per token from one timed forward per {BUCKET}-token bucket")
    head = (f"{'model':>6} {'params':>7} {'dtype':>8} {'B':>2} {'new':>4} | {'cached tok/s':>12} "
            f"{'recompute tok/s':>15} {'speedup':>8} | {'prefill tok/s':>13} {'cache MiB':>9}")
    print(head)
    print("-" * len(head))
    for name, dtype in itertools.product(a.models.split(","), a.compute_dtypes.split(",")):
        cfg = model_cfg(name)
        if dtype != "config":
            cfg = dataclasses.replace(cfg, compute_dtype=dtype)
        params = jaxllm.init_params(cfg, jax.random.key(0))
        n = jaxllm.model.count_params(params)
        for b in map(int, a.batches.split(",")):
            for new in map(int, a.new.split(",")):
                r = bench_case(cfg, params, b, a.prompt, new, a.repeats)
                print(f"{name:>6} {n / 1e6:6.1f}M {cfg.compute_dtype:>8} {b:>2} {new:>4} | {r['cached']:12.1f} "
                      f"{r['recompute']:15.1f} {r['cached'] / r['recompute']:7.1f}x | {r['prefill']:13.1f} "
                      f"{r['cache_bytes'] / 2**20:9.2f}", flush=True)


if __name__ == "__main__":
    main()
