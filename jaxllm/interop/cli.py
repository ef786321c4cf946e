"""`jaxllm convert`: orbax run checkpoints <-> HF safetensors (params only)."""
from __future__ import annotations

import json
import pathlib


def convert(src: str, dst: str, to: str) -> str:
    """to='hf': a run dir / orbax checkpoint dir -> HF directory (config.json + safetensors).
    to='orbax': an HF directory -> an orbax checkpoint dir that `checkpoint.init_from` reads."""
    import orbax.checkpoint as ocp

    from jaxllm.config import ModelConfig
    from jaxllm.interop.hf import load_hf, save_hf
    from jaxllm.training.checkpoint import CheckpointError, load_params
    if to == "hf":
        params, model = load_params(src)
        if model is None:
            raise CheckpointError(f"{src}: the checkpoint holds no model config (meta item)")
        if isinstance(model.get("rope_scaling"), list):
            model["rope_scaling"] = tuple(model["rope_scaling"])
        save_hf(dst, ModelConfig(**model), params)
        return f"wrote HF checkpoint to {dst}"
    if to == "orbax":
        import dataclasses
        cfg, params = load_hf(src)
        path = pathlib.Path(dst).absolute()
        with ocp.CheckpointManager(path) as mngr:
            mngr.save(0, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}),
                meta=ocp.args.JsonSave({"model": json.loads(json.dumps(dataclasses.asdict(cfg)))})))
            mngr.wait_until_finished()
        return f"wrote orbax checkpoint (params only) to {dst}/0"
    raise ValueError(f"unknown target format '{to}'; valid: hf, orbax")


def _run(args):
    print(convert(args.src, args.dst, args.to))


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints between orbax and HF safetensors")
    p.add_argument("src", help="run dir / orbax checkpoint dir (to hf), or HF model dir (to orbax)")
    p.add_argument("dst")
    p.add_argument("--to", choices=["hf", "orbax"], required=True)
    p.set_defaults(func=_run)
