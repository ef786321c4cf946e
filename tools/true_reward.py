#!/usr/bin/env python
"""Mean true (programmatic) reward of policies on held-out prompts, greedy and sampled, by task.

    .venv/bin/python tools/true_reward.py runs/sft runs/ppo --tokenizer tokenizer \
        --prompts synth/ppo/eval.jsonl --num 100 --samples 8 --temperature 0.7 --top-k 3

The demo's compare stage (jaxllm/demo/evaluate.py) on any models: each answers every prompt
greedily and `--samples` times at the given sampling settings (PPO's rollout settings are what
it optimises), scored by synthetic_tasks.score_response. Prompts need a 'task' field (the
embedded synthetic PPO prompts). The README's RLHF comparison tables come from this script.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="run dirs / HF dirs of the policies")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL prompt records with a 'task'")
    ap.add_argument("--num", type=int, default=100, help="the first N prompts")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()
    if args.samples < 1 or args.num < 1 or not args.temperature > 0:
        ap.error("--samples and --num must be >= 1 and --temperature > 0")
    from jaxllm.demo.evaluate import compare
    res = compare({m: m for m in args.models}, args.tokenizer, args.prompts, args.num, args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, samples=args.samples)
    kinds = sorted(next(iter(res["by_task"].values())))
    print(f"{len(res['prompts'])} prompts; sampled: {args.samples} each at temperature {args.temperature}, "
          f"top-k {args.top_k}")
    print(f"{'model':30s} {'answers':8s} {'mean':>7s} " + " ".join(f"{k:>8s}" for k in kinds))
    for tag, c in (("greedy", res), ("sampled", res["sampled"])):
        for m in args.models:
            print(f"{m:30s} {tag:8s} {c['mean_true_reward'][m]:+7.3f} "
                  + " ".join(f"{c['by_task'][m][k]:+8.3f}" for k in kinds))


if __name__ == "__main__":
    main()
