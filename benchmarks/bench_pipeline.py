"""Input pipeline throughput vs. what the train step consumes, measured in one run.

    .venv/bin/python benchmarks/bench_pipeline.py [--model 25m] [--seq-len 256] [--batch 8]

1. Writes the default corpus (20k documents) and trains its tokenizer, as the recipe's setup does.
2. Pipeline tokens/s (read JSONL -> tokenize -> split -> pack -> batch, grain) with 0 (in-process),
   1 and 2 mp_prefetch workers, after a warm-up batch (worker start-up excluded).
3. Train-step tokens/s of the chosen model config on this CPU through `jaxllm.train`, fed by the
   same pipeline (compile excluded: the first logged interval is dropped).
Prints one JSON line with all figures and the ratio pipeline / step (the issue asks >= 10x).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time


def pipeline_tokens_per_s(cfg, tok, *, seq_len: int, batch: int, workers: int, seconds: float) -> dict:
    from jaxllm.data import pipeline
    cfg = dataclasses.replace(cfg, num_workers=workers)
    it = pipeline.make_train_iterator(cfg, seq_len=seq_len, global_batch_size=batch, seed=0,
                                      process_index=0, process_count=1, tokenizer=tok)
    t0 = time.perf_counter()
    next(it)  # warm-up: worker processes start, first packs fill
    startup = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    dt = time.perf_counter() - t0
    stats = dict(it.stats)
    it.close()
    return {"workers": workers, "tokens_per_s": n * batch * seq_len / dt, "batches": n,
            "startup_s": round(startup, 2),
            "padding_fraction": round(stats["padding_tokens"] / max(1, stats["tokens"] + stats["padding_tokens"]), 4),
            "split_pieces": stats["split_pieces"], "documents": stats["documents"]}


def step_tokens_per_s(model: str, data_cfg, *, seq_len: int, batch: int, steps: int, run_dir: str) -> float:
    import jaxllm
    cfg = jaxllm.load_config(None, [
        f"model={model}", f"train.seq_len={seq_len}", f"train.batch_size={batch}",
        f"train.steps={steps}", "train.log_every=2", "train.eval_every=0", "train.progress=false",
        f"train.run_dir={run_dir}", "checkpoint.every=0", "checkpoint.resume=false"])
    cfg = dataclasses.replace(cfg, data=data_cfg)
    summary = jaxllm.train(cfg)
    # history: step 1 (includes compilation), then every 2 steps; keep the steady intervals.
    steady = [h["tokens_per_s"] for h in summary["history"] if h["step"] > 2]
    return statistics.median(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="25m", help="model preset in configs/model/")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=8.0, help="pipeline timing window per setting")
    ap.add_argument("--steps", type=int, default=10, help="train steps for the consumption figure")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    from jaxllm.data import synthetic
    from jaxllm.data.config import DataConfig
    from jaxllm.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = synthetic.prepare_default_data(tmp, train_docs=args.docs, eval_docs=100,
                                               vocab_size=args.vocab_size, tasks=False)
        prep_s = time.perf_counter() - t0
        data_cfg = DataConfig(kind="text", sources=[{"path": paths["train"]}], tokenizer=paths["tokenizer"])
        tok = load_tokenizer(paths["tokenizer"])
        results = []
        for w in args.workers:
            r = pipeline_tokens_per_s(data_cfg, tok, seq_len=args.seq_len, batch=args.batch,
                                      workers=w, seconds=args.seconds)
            results.append(r)
            print(f"pipeline  workers={w}: {r['tokens_per_s']:>12,.0f} tokens/s  "
                  f"(start-up {r['startup_s']} s, padding {r['padding_fraction']:.1%})", flush=True)
        step = step_tokens_per_s(args.model, data_cfg, seq_len=args.seq_len, batch=args.batch,
                                 steps=args.steps, run_dir=f"{tmp}/run")
        print(f"train step ({args.model}, B={args.batch}, T={args.seq_len}): {step:>10,.0f} tokens/s")
        for r in results:
            r["x_step"] = round(r["tokens_per_s"] / step, 1)
            print(f"  workers={r['workers']}: pipeline is {r['x_step']}x the step's consumption")
        print(json.dumps({"bench": "pipeline", "model": args.model, "seq_len": args.seq_len,
                          "batch": args.batch, "corpus_prep_s": round(prep_s, 2),
                          "step_tokens_per_s": round(step), "pipeline": results}))


if __name__ == "__main__":
    main()
