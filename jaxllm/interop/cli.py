"""`jaxllm convert`: orbax run checkpoints <-> HF safetensors (params only).

The destination must not exist or be empty, unless --overwrite: then jaxllm replaces only what
it writes there (an HF export's config.json and model*.safetensors; an orbax export's step 0).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

from jaxllm.errors import UserError


def _check_destination(dst: pathlib.Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise UserError(f"{dst} is not empty; choose a new destination or pass --overwrite "
                        f"(replaces only the files the conversion writes)")


def convert(src: str, dst: str, to: str, overwrite: bool = False) -> str:
    """to='hf': a run dir / orbax checkpoint dir -> HF directory (config.json + safetensors).
    to='orbax': an HF directory -> an orbax checkpoint dir that `checkpoint.init_from` reads.
    Checkpoints written on any mesh or device count load here (onto this process's devices)."""
    import orbax.checkpoint as ocp

    from jaxllm.config import ModelConfig
    from jaxllm.interop.hf import load_hf, save_hf
    from jaxllm.training.checkpoint import CheckpointError, load_params
    out = pathlib.Path(dst)
    if to not in ("hf", "orbax"):
        raise UserError(f"unknown target format '{to}'; valid: hf, orbax")
    _check_destination(out, overwrite)
    if to == "hf":
        params, model = load_params(src)
        if model is None:
            raise CheckpointError(f"{src}: the checkpoint holds no model config (meta item)")
        if isinstance(model.get("rope_scaling"), list):
            model["rope_scaling"] = tuple(model["rope_scaling"])
        save_hf(out, ModelConfig(**model), params)
        return f"wrote HF checkpoint to {out}"
    cfg, params = load_hf(src)
    path = out.absolute()
    if (path / "0").exists():   # --overwrite: our own step-0 export, replaced as a whole
        shutil.rmtree(path / "0")
    with ocp.CheckpointManager(path) as mngr:
        mngr.save(0, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}),
            meta=ocp.args.JsonSave({"model": json.loads(json.dumps(dataclasses.asdict(cfg)))})))
        mngr.wait_until_finished()
    return f"wrote orbax checkpoint (params only) to {out}/0"


def _run(args):
    print(convert(args.src, args.dst, args.to, overwrite=args.overwrite))


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints between orbax and HF safetensors")
    p.add_argument("src", help="run dir / orbax checkpoint dir (to hf), or HF model dir (to orbax)")
    p.add_argument("dst", help="a new or empty directory")
    p.add_argument("--to", choices=["hf", "orbax"], required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty DST (replaces only the files the conversion writes)")
    p.set_defaults(func=_run)
