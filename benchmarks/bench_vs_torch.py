"""jaxllm's train step vs HF transformers' LlamaForCausalLM + torch AdamW, same geometry, same
machine, same run (ratios only; absolute times drift on a shared machine).

torch is not a jaxllm dependency: point --torch-python at an interpreter that has torch and
transformers (e.g. a venv made with `pip install torch==2.13.0 transformers`, the CPU build).

    .venv/bin/python benchmarks/bench_vs_torch.py --torch-python /path/to/venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_train import throughput  # noqa: E402

TORCH_SCRIPT = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
c = json.loads(sys.argv[1]); b, t, steps = c.pop("batch"), c.pop("seq"), c.pop("steps")
torch.manual_seed(0)
torch.set_num_threads(max(1, torch.get_num_threads()))
model = LlamaForCausalLM(LlamaConfig(**c, attn_implementation="sdpa"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
x = torch.randint(0, c["vocab_size"], (b, t))
out = {}
for name, ctx in (("float32", torch.autocast("cpu", enabled=False)),
                  ("bfloat16", torch.autocast("cpu", dtype=torch.bfloat16))):
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with ctx:
            loss = model(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    out[name] = b * t / sorted(times)[len(times) // 2]
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch-python", default=os.environ.get("JAXLLM_TORCH_PYTHON", ""))
    ap.add_argument("--model", default="25m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if not args.torch_python:
        print("no --torch-python given (an interpreter with torch + transformers): nothing to compare")
        return
    ours = {}
    for dtype in ("float32", "bfloat16"):
        cfg, tps, _, _ = throughput(args.model, args.batch, args.seq, args.steps,
                                    [f"model.compute_dtype={dtype}"])
        ours[dtype] = tps
    m = cfg.model
    hf = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
              num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
              num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
              rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
              batch=args.batch, seq=args.seq, steps=args.steps)
    res = subprocess.run([args.torch_python, "-c", TORCH_SCRIPT, json.dumps(hf)],
                         capture_output=True, text=True, check=True)
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, train step incl. AdamW, tokens/s:")
    print(f"{'compute':10} {'jaxllm':>10} {'transformers':>13} {'ratio':>7}")
    for dtype in ("float32", "bfloat16"):
        print(f"{dtype:10} {ours[dtype]:10,.0f} {theirs[dtype]:13,.0f} {ours[dtype] / theirs[dtype]:6.2f}x")


if __name__ == "__main__":
    main()
