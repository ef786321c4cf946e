#!/usr/bin/env python
"""Check that a HuggingFace checkpoint directory loads in transformers and
reproduces reference logits.

Run with the peer venv (torch + transformers), not the project venv:

    /work/peer-venv/bin/python tools/check_hf_load.py DIR [--ref NPZ] [--atol 1e-4]

Loads DIR with AutoModelForCausalLM.from_pretrained(DIR, float32,
output_loading_info=True) and fails (exit 1) if any missing / unexpected /
mismatched keys are reported. If a reference npz is available (--ref, else
DIR/reference.npz) its ``input_ids`` are run and the max abs diff vs its
``logits`` is printed; exit 1 if it exceeds --atol. If the npz also has
``position_ids``/``logits_positions`` (and ``position_ids_gapped``/
``logits_positions_gapped``) those are checked too. Without a reference a
fixed random batch is run and only finiteness is checked.

Intended use: confirm that files written by jaxllm's save_hf load in
transformers and give the same logits as the JAX model (write the JAX logits
for the same input_ids to an npz with the keys above and pass it via --ref).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

PAIRS = (
    (None, "logits"),
    ("position_ids", "logits_positions"),
    ("position_ids_gapped", "logits_positions_gapped"),
)


def load(path: str):
    kw = dict(attn_implementation="eager", output_loading_info=True)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    except TypeError:  # transformers < 4.56 only knows torch_dtype
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="HF checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("--ref", help="reference npz (default: DIR/reference.npz if present)")
    ap.add_argument("--atol", type=float, default=1e-4, help="max allowed abs logits diff (default 1e-4)")
    args = ap.parse_args()

    print(f"torch {torch.__version__}  transformers {transformers.__version__}")
    try:
        model, info = load(args.dir)
    except Exception as e:  # e.g. shape mismatch: transformers raises instead of reporting
        print(f"FAIL loading raised {type(e).__name__}: {e}")
        print("FAILED")
        return 1
    model.eval()
    ok = True
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        vals = info.get(key) or []
        if vals:
            ok = False
            print(f"FAIL {key}: {sorted(map(str, vals))}")
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    print(
        f"loaded {type(model).__name__}: vocab={cfg.vocab_size} hidden={cfg.hidden_size} "
        f"layers={cfg.num_hidden_layers} heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} "
        f"tied={tied} params={sum(p.numel() for p in model.parameters())}"
    )
    if tied and model.get_output_embeddings() is not None:
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            ok = False
            print("FAIL tie_word_embeddings=True but lm_head is not tied to embed_tokens")

    ref_path = args.ref or os.path.join(args.dir, "reference.npz")
    if os.path.exists(ref_path):
        ref = np.load(ref_path)
        input_ids = torch.from_numpy(ref["input_ids"].astype(np.int64))
        for pos_key, logit_key in PAIRS:
            if logit_key not in ref.files or (pos_key is not None and pos_key not in ref.files):
                continue
            kwargs = {}
            if pos_key is not None:
                kwargs["position_ids"] = torch.from_numpy(ref[pos_key].astype(np.int64))
            with torch.no_grad():
                out = model(input_ids, **kwargs).logits.float().numpy()
            want = ref[logit_key]
            if out.shape != want.shape:
                ok = False
                print(f"FAIL {logit_key}: shape {out.shape} != reference {want.shape}")
                continue
            diff = float(np.abs(out - want).max())
            good = np.isfinite(out).all() and diff <= args.atol
            ok &= bool(good)
            print(f"{'ok  ' if good else 'FAIL'} {logit_key}: max abs diff {diff:.3e} (atol {args.atol:g})")
    else:
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
        with torch.no_grad():
            out = model(input_ids).logits.float().numpy()
        good = bool(np.isfinite(out).all())
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} no reference npz; random batch logits finite={good} std={out.std():.4f}")

    print("PASS" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
