#!/usr/bin/env python
"""Pairwise accuracy of a reward model on a rankings file, by synthetic task kind.

    .venv/bin/python tools/reward_accuracy.py RM_RUN RANKINGS --tokenizer DIR

RANKINGS is JSONL of {"prompt", "task", "responses": best first} — the embedded synthetic
rankings (data/synth/reward/eval.jsonl: hand-written answer variants) or `jaxllm data rank`'s
rankings of a policy's own samples. Every pair (i < j) of a record counts once: right when the
model scores the better answer higher. Comparing the two files shows whether a reward model
that ranks hand-written variants well also ranks what the policy actually says (on the quick
demo's models it did not: README "Results").
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reward_model", help="a reward run dir (train.objective=reward) or an HF export")
    ap.add_argument("rankings", help="JSONL rankings, best first, with a 'task' per record")
    ap.add_argument("--tokenizer", required=True, help="the tokenizer the reward model reads")
    ap.add_argument("--seq-len", type=int, default=192)
    args = ap.parse_args()

    from jaxllm.data import chat
    from jaxllm.data.preference import render_response
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.evaluation.source import model_config
    from jaxllm.objectives.reward import score
    from jaxllm.training.checkpoint import load_params, source_model_config
    tok = load_tokenizer(args.tokenizer)
    template = chat.resolve_template(tok)
    cfg = model_config(source_model_config(args.reward_model), args.reward_model)
    params, _ = load_params(args.reward_model)
    fn = jax.jit(lambda p, t, s, pos: score(p, t, s, cfg, positions_nt=pos))
    right = collections.defaultdict(list)
    with open(args.rankings, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for rec in records:
        rows = [render_response(rec["prompt"], r, tok, template, args.seq_len)[0] for r in rec["responses"]]
        toks = np.full((len(rows), args.seq_len), tok.pad_id, np.int32)
        seg = np.zeros_like(toks)
        pos = np.zeros_like(toks)
        for i, ids in enumerate(rows):
            toks[i, :len(ids)], seg[i, :len(ids)], pos[i, :len(ids)] = ids, 1, np.arange(len(ids))
        s = np.asarray(fn(params, toks, seg, pos))
        kind = rec.get("task", {}).get("kind", "?")
        right[kind] += [bool(s[i] > s[j]) for i, j in itertools.combinations(range(len(rows)), 2)]
    for kind, v in sorted(right.items()):
        print(f"{kind:8s} pairs {len(v):5d}  accuracy {np.mean(v):.3f}")
    every = list(itertools.chain(*right.values()))
    print(f"{'all':8s} pairs {len(every):5d}  accuracy {np.mean(every):.3f}  ({len(records)} rankings)")


if __name__ == "__main__":
    main()
