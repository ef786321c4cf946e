"""jaxllm's train step vs HF transformers' LlamaForCausalLM + torch AdamW (eager and
torch.compile, fp32 and bf16 autocast), same geometry, same machine, interleaved in one run.

Each round times `--steps` train steps of every variant in turn (jaxllm in this process, torch
in one resident worker process, jaxllm with model.dot_output=compute in another, since the XLA
flags that setting needs act on a whole process; never two at once), so the machine's drift
hits all variants alike; the table gives the median over rounds and the spread (min-max). The same run measures
each framework's 2048^3 GEMM peak (jnp.dot, torch.mm; fp32, and bf16 operands) and reports MFU =
model FLOPs/s (training.metrics.flops_per_token, the same count for both) / the framework's own
fastest GEMM peak. On CPU it also runs jaxllm fp32 with model.matmul=blas (every matmul of the
step an OpenBLAS sgemm custom call, jaxllm/model/cpu_gemm.py; --no-blas leaves it out), whose
MFU is against that GEMM's own peak when it is the faster one.

torch is not a jaxllm dependency: the torch side runs in .venv-torch, which this script creates
on first use (`pip install torch==2.13.0 transformers`: the CPU build, from this machine's wheel
cache for Python 3.11), or in the interpreter given by --torch-python.

    .venv/bin/python benchmarks/bench_vs_torch.py [--models 25m,125m] [--rounds 5] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_train import build  # noqa: E402

from jaxllm import host_alloc, xla_flags  # noqa: E402
from jaxllm.model import cpu_gemm  # noqa: E402
from jaxllm.training.metrics import flops_per_token, gemm_flops, measure_peak_flops  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
TORCH_VENV = REPO / ".venv-torch"

# The torch worker: reads one JSON command per line on stdin, answers one "@@{json}" line.
TORCH_WORKER = r"""
import ctypes, json, os, sys, time, warnings
if os.environ.get("BENCH_TORCH_HOST_ALLOC") == "keep":   # the glibc settings of jaxllm.host_alloc
    print("torch worker: mallopt", [ctypes.CDLL("libc.so.6").mallopt(p, v) for p, v in ((-8, 1), (-4, 0), (-1, -1))],
          file=sys.stderr)
import torch
from transformers import LlamaConfig, LlamaForCausalLM
warnings.filterwarnings("ignore")
torch.manual_seed(0)
def reply(obj):
    print("@@" + json.dumps(obj), flush=True)
def peak(dtype, n=2048, reps=5):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best
def _timed(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
state = {}
for line in sys.stdin:
    c = json.loads(line)
    if c["cmd"] == "peaks":
        f32 = peak(torch.float32)
        # bf16 first at 256^3: on a CPU without bf16 instructions torch's bf16 GEMM runs ~0.3
        # GFLOP/s, and the 2048^3 measurement alone would take ~6 minutes
        bf16 = peak(torch.bfloat16, n=256, reps=2)
        if bf16 >= 0.25 * f32:
            bf16 = peak(torch.bfloat16)
        reply({"float32": f32, "bfloat16": bf16, "threads": torch.get_num_threads(), "torch": torch.__version__})
    elif c["cmd"] == "setup":
        hf, b, t = c["hf"], c["batch"], c["seq"]
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa"))
        # fused AdamW: PyTorch's fastest CPU optimizer step (one kernel over all params)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        x = torch.randint(0, hf["vocab_size"], (b, t))
        state = {"model": model, "compiled": torch.compile(model), "opt": opt, "x": x}
        reply({"ok": True})
    elif c["cmd"] == "run":
        mode, dtype, steps = c["mode"], c["dtype"], c["steps"]
        m = state["compiled"] if mode == "compile" else state["model"]
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
               else torch.autocast("cpu", enabled=False))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            with ctx:
                loss = m(input_ids=state["x"], labels=state["x"]).loss
            loss.backward(); state["opt"].step(); state["opt"].zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        reply({"times": times, "loss": float(loss)})
"""


def torch_python(arg: str) -> str:
    if arg:
        return arg
    py = TORCH_VENV / "bin" / "python"
    if not py.exists():
        base = shutil.which("python3.11")
        if base is None:
            sys.exit("bench_vs_torch: no python3.11 on PATH to build .venv-torch (the CPU torch wheel "
                     "on this machine is for 3.11); pass --torch-python an interpreter with torch + transformers")
        print(f"creating {TORCH_VENV} (torch==2.13.0 CPU build + transformers) with {base}", flush=True)
        subprocess.run([base, "-m", "venv", str(TORCH_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "transformers"], check=True)
    return str(py)


class TorchWorker:
    def __init__(self, python: str, host_alloc: str):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", BENCH_TORCH_HOST_ALLOC=host_alloc)
        self.proc = subprocess.Popen([python, "-c", TORCH_WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"{type(self).__name__} exited (code {self.proc.wait()}); its stderr is above")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


class JaxWorker:
    """jaxllm variants with model.dot_output=compute, in a process of their own: the XLA flags
    that setting needs (jaxllm/xla_flags.py) act on every computation of a process, and would
    send the fp32 variants' dots to a slower kernel. Same protocol as the torch worker."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--jax-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    ask = TorchWorker.ask
    close = TorchWorker.close


def jax_worker() -> None:
    """The loop of `--jax-worker`: flags first (before the backend starts), then commands."""
    from jaxllm.config import ModelConfig
    print(f"jax worker: {host_alloc.keep_pages()}; "
          f"{xla_flags.apply(ModelConfig(compute_dtype='bfloat16', dot_output='compute'))}", file=sys.stderr)
    variant = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "peaks":
            out = {"bfloat16": measure_peak_flops(jnp.bfloat16, n=2048, out_dtype=jnp.bfloat16)}
        elif cmd["cmd"] == "setup":
            variant = JaxVariant(cmd["model"], cmd["batch"], cmd["seq"], "bfloat16",
                                 ["model.dot_output=compute", *cmd["overrides"]])
            out = {}
        else:
            out = {"times": variant.run(cmd["steps"])}
        print("@@" + json.dumps(out), flush=True)


class JaxVariant:
    """The jitted train step of one (model, compute dtype), kept compiled across rounds."""

    def __init__(self, model, batch, seq, dtype, overrides):
        self.cfg, self.mesh, self.rules, self.state, self.step, self.batches = build(
            model, batch, seq, [f"model.compute_dtype={dtype}", *overrides])

    def run(self, steps: int) -> list[float]:
        times = []
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for i in range(steps):
                t0 = time.perf_counter()
                self.state, m = self.step(self.state, self.batches[i % 2], None)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
        return times


def hf_geometry(m) -> dict:
    return dict(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                head_dim=m.head_dim or m.d_model // m.n_heads, max_position_embeddings=m.max_seq_len,
                rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings)


def torch_dtypes(peaks) -> tuple[str, ...]:
    """The torch dtypes worth a train step: bf16 autocast only where torch's bf16 GEMM is a real
    kernel. On a CPU without bf16 instructions (AVX2) torch.mm in bf16 ran ~1 GFLOP/s against
    160 in fp32 (torch 2.13, AMD EPYC): a 25m step would take many minutes, and no torch user
    would pick that mode."""
    p = peaks["torch"]
    return ("float32", "bfloat16") if p["bfloat16"] >= 0.25 * p["float32"] else ("float32",)


# model.dot_output=compute with what the launcher sets: oneDNN's AMX dots on a CPU with AMX,
# no flags elsewhere (jaxllm/xla_flags.py).
COMPUTE = "jaxllm bf16 dots=compute"
# model.matmul=blas: the fp32 step's matmuls through OpenBLAS (jaxllm/model/cpu_gemm.py).
BLAS = "jaxllm fp32 matmul=blas"


def bench_model(model, batch, seq, args, worker, jw, peaks) -> None:
    variants: dict[str, object] = {}
    for dtype in ("float32", "bfloat16"):
        variants[f"jaxllm {dtype}"] = JaxVariant(model, batch, seq, dtype, args.override)
    if not args.no_blas:
        variants[BLAS] = JaxVariant(model, batch, seq, "float32", ["model.matmul=blas", *args.override])
    cfg = variants["jaxllm float32"].cfg
    if jw is not None:
        jw.ask(cmd="setup", model=model, batch=batch, seq=seq, overrides=args.override)
        variants[COMPUTE] = "jax_worker"
    worker.ask(cmd="setup", hf=hf_geometry(cfg.model), batch=batch, seq=seq)
    for mode in ("eager", "compile"):
        for dtype in torch_dtypes(peaks):
            variants[f"torch {mode} {dtype}"] = (mode, dtype)

    def run(name, steps):
        v = variants[name]
        if isinstance(v, JaxVariant):
            return v.run(steps)
        if v == "jax_worker":
            return jw.ask(cmd="run", steps=steps)["times"]
        return worker.ask(cmd="run", mode=v[0], dtype=v[1], steps=steps)["times"]

    t0 = time.perf_counter()
    for name in variants:            # warm-up: jit / torch.compile (both dtypes), first steps
        run(name, 2)
    print(f"  warm-up (compiles included): {time.perf_counter() - t0:.0f} s", flush=True)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name in variants:
            rates[name].append(batch * seq / statistics.median(run(name, args.steps)))
    fpt = flops_per_token(cfg.model, seq)
    best_torch = max(statistics.median(rates[k]) for k in rates if k.startswith("torch"))
    # MFU against the framework's fastest GEMM (bf16 with AMX; fp32 on a CPU without bf16 hardware)
    best_peak = {"jax": max(peaks["jax"].values()), "torch": max(peaks["torch"].values())}
    best_peak[COMPUTE] = max(best_peak["jax"], peaks.get("jax dots=compute", {}).get("bfloat16", 0))
    best_peak[BLAS] = max(best_peak["jax"], peaks.get("jax blas", {}).get("float32", 0))
    print(f"model {model} ({cfg.model.n_layers} layers, d {cfg.model.d_model}), batch {batch} x seq {seq}, "
          f"train step incl. AdamW; {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"| {'variant':24} | tokens/s (median) | spread | model GFLOP/s | MFU vs own best peak | vs best torch |")
    print("|---|---|---|---|---|---|")
    for name, rs in rates.items():
        med = statistics.median(rs)
        peak = best_peak[name if name in (COMPUTE, BLAS) else "jax" if name.startswith("jaxllm") else "torch"]
        print(f"| {name:24} | {med:,.0f} | {min(rs):,.0f}-{max(rs):,.0f} | {med * fpt / 1e9:.1f} | "
              f"{med * fpt / peak:.1%} | {med / best_torch:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch-python", default=os.environ.get("JAXLLM_TORCH_PYTHON", ""))
    ap.add_argument("--models", default="25m,125m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--override", action="append", default=[],
                    help="a jaxllm config override for both dtypes, e.g. model.scan_layers=false (repeatable)")
    ap.add_argument("--torch-host-alloc", choices=("default", "keep"), default="default",
                    help="glibc settings of the torch worker: its defaults (as torch users run it), or "
                         "jaxllm.host_alloc's (one arena, no mmap, no trim) to see what they do for torch")
    ap.add_argument("--no-compute-dots", action="store_true",
                    help=f"leave out the '{COMPUTE}' variant (model.dot_output=compute, in its own process)")
    ap.add_argument("--no-blas", action="store_true",
                    help=f"leave out the '{BLAS}' variant (model.matmul=blas: OpenBLAS sgemm custom calls)")
    ap.add_argument("--jax-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.jax_worker:
        return jax_worker()
    # As `jaxllm train` does: before the backend's threads start (JAXLLM_HOST_ALLOC=default: off).
    print(f"jaxllm {host_alloc.keep_pages()}; torch worker: glibc {args.torch_host_alloc}", flush=True)
    worker = TorchWorker(torch_python(args.torch_python), args.torch_host_alloc)
    jw = None
    try:
        tp = worker.ask(cmd="peaks")
        peaks = {"jax": {d: measure_peak_flops(jnp.dtype(d), n=2048) for d in ("float32", "bfloat16")},
                 "torch": {d: tp[d] for d in ("float32", "bfloat16")}}
        if not args.no_blas:
            try:
                peaks["jax blas"] = {"float32": gemm_flops(cpu_gemm.sgemm, jnp.float32, n=2048)}
            except cpu_gemm.BlasUnavailable as e:
                print(f"'{BLAS}' left out: {e}", flush=True)
                args.no_blas = True
        if not args.no_compute_dots:       # started only now, so its start-up overlaps no peak measurement
            jw = JaxWorker()
            peaks["jax dots=compute"] = jw.ask(cmd="peaks")
        amx = "with" if "amx_bf16" in xla_flags.cpu_features() else "without"
        print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({amx} AMX); torch {tp['torch']} "
              f"({tp['threads']} threads); overrides {args.override or 'none'}")
        print("same-run 2048^3 GEMM peaks, GFLOP/s: " + "; ".join(
            f"{fw} " + ", ".join(f"{'fp32' if d == 'float32' else 'bf16'} {v / 1e9:.0f}" for d, v in p.items())
            for fw, p in peaks.items()) + (
            "  (jax dots=compute: bf16 -> bf16 dot under the launcher's flags)" if jw else "") + (
            "  (jax blas: OpenBLAS sgemm, model.matmul=blas)" if "jax blas" in peaks else ""))
        if "bfloat16" not in torch_dtypes(peaks):
            print(f"torch bf16 autocast left out: torch's bf16 GEMM runs {tp['bfloat16'] / 1e9:.1f} GFLOP/s "
                  f"here against {tp['float32'] / 1e9:.0f} in fp32 (no bf16 kernel on this CPU)", flush=True)
        for model in args.models.split(","):
            bench_model(model, args.batch, args.seq, args, worker, jw, peaks)
    finally:
        worker.close()
        if jw is not None:
            jw.close()


if __name__ == "__main__":
    main()
