"""`jaxllm convert`: orbax run checkpoints <-> HF safetensors (params only), and a LoRA run's
adapter in PEFT's format.

The destination must not exist or be empty, unless --overwrite: then jaxllm replaces only what
it writes there (an HF export's config.json, model.safetensors or its shards and index, and the
tokenizer files it writes; an orbax export's step 0). Tokenizer files left in DST when SRC names
no tokenizer are refused, not deleted.
An HF export carries the run's tokenizer (data.tokenizer of its config.yaml, or --tokenizer):
its files, its bos/eos/pad ids in config.json and, for a chat run, the template it trained with.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

from jaxllm.errors import UserError


def _check_destination(dst: pathlib.Path, overwrite: bool, src: str | pathlib.Path) -> None:
    if dst.resolve() == pathlib.Path(src).resolve():
        raise UserError(f"{dst} is the source itself; write the conversion to another directory")
    if dst.is_dir() and any((dst / name).exists() for name in ("checkpoints", "config.yaml")):
        raise UserError(f"{dst} is a run dir (it holds checkpoints/ or config.yaml), not a place for a "
                        f"conversion: even with --overwrite, choose another directory")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise UserError(f"{dst} is not empty; choose a new destination or pass --overwrite "
                        f"(replaces only the files the conversion writes)")


_EXPORT_MARK = "jaxllm convert --to orbax"


def _check_own_export(step_dir: pathlib.Path) -> None:
    """--overwrite deletes a step-0 directory only if this command wrote it (its meta item says
    so): a run's checkpoints/ folder, or anything else, is refused, not deleted."""
    try:
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("written_by") != _EXPORT_MARK:
        raise UserError(f"{step_dir} was not written by `jaxllm convert --to orbax`; --overwrite replaces "
                        f"only such an export and will not delete it: choose another destination")


_NO_TOKENIZER = ("; no tokenizer written (the source names none): pass --tokenizer to generate, "
                 "and set bos/eos ids for transformers")


def _source_tokenizer(src: str, override: str | None) -> str | None:
    """Where SRC's tokenizer is (as generate finds it), or None when SRC names none; a named
    tokenizer that does not exist is an error."""
    from jaxllm.evaluation.source import _run_dir_tokenizer, tokenizer_path
    try:
        return tokenizer_path(src, override)
    except UserError:
        if override or _run_dir_tokenizer(pathlib.Path(src))[0]:
            raise
        return None


def _trained_chat_template(src: str, tok) -> str | None:
    """The Jinja source of the template SRC's run trained with (data.chat_template of a chat
    run's config.yaml; built-in ChatML as Jinja), or None: not a chat run, or the tokenizer's own."""
    from jaxllm.data.chat import CHATML, load_template
    from jaxllm.evaluation.source import run_section
    from jaxllm.interop.hf import CHATML_JINJA
    data, _ = run_section(src, "data")
    if data.get("kind") != "chat":
        return None
    spec = data.get("chat_template") or ""
    if spec == CHATML or (not spec and getattr(tok, "chat_template", None) is None):
        return CHATML_JINJA
    return load_template(spec, tok).source if spec else None


def convert(src: str, dst: str, to: str, overwrite: bool = False, tokenizer: str | None = None) -> str:
    """to='hf': a run dir / orbax checkpoint dir -> HF directory (config.json + safetensors).
    to='orbax': an HF directory -> an orbax checkpoint dir that `checkpoint.init_from` reads.
    Checkpoints written on any mesh or device count load here (onto this process's devices).
    `tokenizer` (to='hf'): the tokenizer to export, in place of the one SRC's run names."""
    import orbax.checkpoint as ocp

    from jaxllm.config import ModelConfig
    from jaxllm.interop.hf import TOKENIZER_FILES, load_hf, save_hf, save_tokenizer
    from jaxllm.training.checkpoint import CheckpointError, load_policy
    out = pathlib.Path(dst)
    if to not in ("hf", "orbax", "peft"):
        raise UserError(f"unknown target format '{to}'; valid: hf, orbax, peft")
    if tokenizer and to != "hf":
        raise UserError(f"--tokenizer goes with --to hf (an HF export carries a tokenizer); --to {to} "
                        f"writes none: drop it")
    _check_destination(out, overwrite, src)
    tok_path = _source_tokenizer(src, tokenizer) if to == "hf" else None   # before the params: fail fast
    if to == "hf" and tok_path is None and out.is_dir():
        stale = [name for name in TOKENIZER_FILES if (out / name).exists()]
        if stale:   # they would not describe this model, and jaxllm may not have written them
            raise UserError(f"{out} holds {', '.join(stale)}, and {src} names no tokenizer to replace them: "
                            f"pass --tokenizer, or remove them (jaxllm does not delete files it may not have written)")
    if to in ("hf", "peft"):
        params, model, delta = load_policy(src)
        if "reward_head" in params:   # a reward model: *ForSequenceClassification, with pad/eos ids
            if to == "peft":
                raise UserError(f"{src} is a reward model; --to peft exports a LoRA run's adapter")
            if tokenizer:
                raise UserError(f"{src} is a reward model: it is exported with its run's tokenizer (whose pad and "
                                f"eos ids transformers scores with); drop --tokenizer")
            from jaxllm.training.reward import export_hf
            return export_hf(src, out)
        if model is None:
            raise CheckpointError(f"{src}: the checkpoint holds no model config (meta item)")
        if isinstance(model.get("rope_scaling"), list):
            model["rope_scaling"] = tuple(model["rope_scaling"])
        cfg = ModelConfig(**model)
        if to == "peft":
            if delta is None or delta[0] != "lora":
                raise UserError(f"{src}: --to peft exports a LoRA run's adapter; this run trained "
                                f"{'adapters' if delta else 'the full model'} (use --to hf)")
            from jaxllm.interop.peft import save_peft
            base = {k: v for k, v in params.items() if k not in ("lora", "tokens")}
            save_peft(out, cfg, delta[2], delta[1], base=base)
            return f"wrote the LoRA adapter (PEFT format) to {out}"
        if delta is not None:
            if delta[0] != "lora":
                raise UserError(f"{src}: bottleneck adapters have no place in a transformers Llama "
                                f"checkpoint; export the base, or train LoRA to merge")
            from jaxllm.model import lora
            params = lora.merge({k: v for k, v in params.items() if k not in ("lora", "tokens")}, delta[2], delta[1])
        quantized = getattr(delta[1], "quantize_base", "none") if delta else "none"
        if quantized != "none":   # QLoRA: merge dequantized only the adapted kernels; the rest here
            from jaxllm.model import quant
            params = quant.dequantize_tree(params)
        ids: dict = {}
        if tok_path is not None:
            from jaxllm.data.tokenizer import check_vocab, load_tokenizer
            try:
                tok = load_tokenizer(tok_path)
                check_vocab(tok, cfg.vocab_size)
            except ValueError as e:
                raise UserError(f"{src}: {e}") from None
            from jaxllm.data.chat import special_tokens
            defined = special_tokens(tok)   # the ids the tokenizer defines (pad: not a fallback)
            ids = {f"{k}_token_id": getattr(tok, f"{k}_id") for k in ("bos", "eos", "pad") if f"{k}_token" in defined}
        save_hf(out, cfg, params, **ids)
        if tok_path is not None:
            save_tokenizer(out, tok_path, _trained_chat_template(src, tok))
        return (f"wrote HF checkpoint to {out}" + (" (LoRA merged into the base" if delta else "")
                + (f", the {quantized} base dequantized to its float dtype)" if quantized != "none"
                   else ")" if delta else "")
                + (f" with the tokenizer {tok_path}" if tok_path else _NO_TOKENIZER))
    cfg, params = load_hf(src)
    path = out.absolute()
    steps = sorted(p.name for p in path.iterdir() if p.name.isdigit() and p.name != "0") if path.is_dir() else []
    if steps:   # a run's checkpoints/: an export written beside its steps would become one of them
        raise UserError(f"{path} holds checkpoint steps {steps[:5]} (a run's checkpoints?): an orbax export "
                        f"goes to a directory of its own; choose another destination")
    if (path / "0").exists():   # --overwrite: our own step-0 export, replaced as a whole
        _check_own_export(path / "0")
        shutil.rmtree(path / "0")
    with ocp.CheckpointManager(path) as mngr:
        mngr.save(0, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}),
            meta=ocp.args.JsonSave({"model": json.loads(json.dumps(dataclasses.asdict(cfg))),
                                    "written_by": _EXPORT_MARK})))
        mngr.wait_until_finished()
    return f"wrote orbax checkpoint (params only) to {out}/0"


def _run(args):
    print(convert(args.src, args.dst, args.to, overwrite=args.overwrite, tokenizer=args.tokenizer))


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints between orbax and HF safetensors")
    p.add_argument("src", help="run dir / orbax checkpoint dir (to hf), or HF model dir (to orbax)")
    p.add_argument("dst", help="a new or empty directory")
    p.add_argument("--to", choices=["hf", "orbax", "peft"], required=True,
                   help="hf: safetensors (a LoRA run is merged into its base); peft: a LoRA run's adapter")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty DST (replaces only the files the conversion writes)")
    p.add_argument("--tokenizer", default=None,
                   help="--to hf: the tokenizer to export with the model (default: the run's data.tokenizer)")
    p.set_defaults(func=_run)
