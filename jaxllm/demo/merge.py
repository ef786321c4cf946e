"""A LoRA SFT run -> one merged model (HF safetensors + its tokenizer), for the stages after
SFT: the reward model and PPO start from a full model (checkpoint.init_from), and neither
reads a LoRA run's delta-only checkpoint.

The run's PEFT adapter (written at the end of every LoRA run) is folded into the base it
adapted (its checkpoint.init_from): W + s A B, model/lora.py `merge`.
"""
from __future__ import annotations

import os
import pathlib
import shutil

from jaxllm.config import load_config
from jaxllm.errors import UserError


def merge_lora_run(run_dir: str, out_dir: str) -> str:
    """Write out_dir (config.json, model.safetensors, tokenizer.model) from a LoRA run dir;
    built in out_dir.tmp and renamed, so out_dir is complete whenever it exists."""
    from jaxllm.evaluation.source import model_config
    from jaxllm.interop.hf import save_hf
    from jaxllm.interop.peft import load_peft
    from jaxllm.model import lora
    from jaxllm.training.checkpoint import load_params
    run = pathlib.Path(run_dir)
    cfg = load_config(run / "config.yaml")
    if not cfg.lora.r or not (run / "adapter").is_dir():
        raise UserError(f"{run_dir} is not a finished LoRA run (no lora.r in its config.yaml or no adapter/)")
    base, saved = load_params(cfg.checkpoint.init_from)
    model_cfg = model_config(saved, cfg.checkpoint.init_from)
    delta, lora_cfg = load_peft(run / "adapter", model_cfg)
    tmp = pathlib.Path(f"{out_dir}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(tmp, model_cfg, lora.merge(base, delta, lora_cfg))
    tok = pathlib.Path(cfg.data.tokenizer)
    shutil.copy(tok / "tokenizer.model" if tok.is_dir() else tok, tmp / "tokenizer.model")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return (f"merged the LoRA adapter of {run_dir} (r={lora_cfg.r}) into its base "
            f"{cfg.checkpoint.init_from} -> {out_dir}")
