"""One PPO iteration's time, split into rollout (KV-cache sampling), scoring, the reference /
value / old-log-prob pass and the updates; and the rollout's tokens/s. Self-contained: builds a
small synthetic corpus, a tokenizer and a briefly pretrained tiny policy in a temp dir first.

    .venv/bin/python benchmarks/bench_rl.py [--prompts 64] [--iterations 4] [--new-tokens 32] [--objective ppo|grpo]

Absolute seconds on this shared machine are noisy: compare the split within one run.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np

import jaxllm
from jaxllm.data.sources import iter_texts
from jaxllm.data.synthetic import write_corpus
from jaxllm.data.tokenizer import train_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--objective", default="ppo", choices=["ppo", "grpo"])
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="bench_rl_")
    write_corpus(f"{d}/synth", train_docs=2000, eval_docs=100, shards=1)
    train_tokenizer(iter_texts([f"{d}/synth/pretrain/train-*.jsonl"]), f"{d}/tok", 512)
    base = ["model=tiny", "train.progress=false", f"data.tokenizer={d}/tok", "mesh.devices=1"]
    jaxllm.train(jaxllm.load_config(None, base + [
        "data.kind=text", f"data.sources=[{{path: '{d}/synth/pretrain/train-*.jsonl'}}]", "train.steps=50",
        "train.batch_size=16", "train.seq_len=128", "train.eval_every=0", "optim.lr=3e-3", f"train.run_dir={d}/pre"]))
    group = 4 if args.objective == "grpo" else 1
    s = jaxllm.train(jaxllm.load_config(None, base + [
        f"train.objective={args.objective}", f"rl.group_size={group}", "data.kind=chat",
        f"data.sources=[{{path: '{d}/synth/ppo/train.jsonl'}}]", f"checkpoint.init_from={d}/pre",
        f"train.batch_size={args.prompts}", f"train.steps={args.iterations}", "train.eval_every=0",
        f"rl.max_new_tokens={args.new_tokens}", "rl.max_prompt_tokens=48", "rl.epochs=2", "rl.minibatches=2",
        f"train.run_dir={d}/rl"]))
    h = s["history"][1:]   # the first iteration compiles
    keys = ("rollout_s", "score_s", "ref_value_s", "update_s")
    mean = {k: float(np.median([x[k] for x in h])) for k in keys}
    total = sum(mean.values())
    print(f"{args.objective}: {args.prompts} prompts x {group} samples x <= {args.new_tokens} new tokens, tiny "
          f"model, median of {len(h)} iterations after the first")
    for k in keys:
        print(f"  {k[:-2]:10s} {mean[k]:7.2f} s  {mean[k] / total:6.1%}")
    print(f"  iteration  {total:7.2f} s;  rollout {np.median([x['rollout_tokens_per_s'] for x in h]):,.0f} "
          f"sampled tokens/s")


if __name__ == "__main__":
    main()
