"""A model to use, from wherever training or conversion left it.

SRC is one of
  a run dir          config.yaml (its data.tokenizer names the tokenizer) + checkpoints/
  a checkpoint dir   orbax steps with the model config in their meta item (a run dir's
                     checkpoints/, or `jaxllm convert --to orbax` output); the tokenizer comes
                     from the run dir above it, or --tokenizer
  an HF dir          config.json + *.safetensors, with tokenizer.json or tokenizer.model beside
Params of the newest complete checkpoint are read (never optimizer state) onto this process's
first device.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import yaml

from jaxllm.config import ModelConfig
from jaxllm.errors import UserError


class Model(NamedTuple):
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    src: str


def model_config(d: dict, where: str) -> ModelConfig:
    """A saved model config dict (JSON turns tuples into lists) -> ModelConfig."""
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{where}: the saved model config has keys this jaxllm does not know: {unknown}")
    if d.get("matmul") == "blas" and jax.default_backend() != "cpu":
        # a kernel choice, not the model: a run trained with CPU GEMMs runs anywhere
        print(f"note: {where} trained with model.matmul=blas (CPU GEMMs); using XLA's matmuls on "
              f"{jax.default_backend()}", file=sys.stderr)
        d["matmul"] = "xla"
    return ModelConfig(**d)


def run_section(src: str | pathlib.Path, section: str) -> tuple[dict, str]:
    """(that section of the config.yaml of SRC's run, SRC being a run dir or its checkpoints/;
    that file), or ({}, "") when SRC is no run's."""
    path = pathlib.Path(src)
    for run in (path, path.parent):
        cfg_file = run / "config.yaml"
        if cfg_file.is_file():
            part = (yaml.safe_load(cfg_file.read_text()) or {}).get(section) or {}
            return (part if isinstance(part, dict) else {}), str(cfg_file)
    return {}, ""


def _run_dir_tokenizer(path: pathlib.Path) -> tuple[str | None, str]:
    """(data.tokenizer of the run's config.yaml or None, where it was looked for)."""
    data, cfg_file = run_section(path, "data")
    if cfg_file:
        return data.get("tokenizer") or None, f"data.tokenizer of {cfg_file}"
    return None, f"a config.yaml in {path} or {path.parent}"


def run_chat_template(src: str | pathlib.Path) -> tuple[str, str]:
    """(data.chat_template of SRC's run config.yaml when the run trained on chat data, that
    file), or ("", "") when it set none (the tokenizer's own template, else ChatML) or SRC is no run."""
    data, cfg_file = run_section(src, "data")
    spec = data.get("chat_template") if data.get("kind") == "chat" else None
    return (spec, cfg_file) if isinstance(spec, str) and spec else ("", "")


def template_for(src: str | pathlib.Path, given: str | None, log) -> str:
    """The chat template to prompt SRC with: `given` (a command's --chat-template), else the one
    its run trained with; a given one that differs from the trained one is said in one line."""
    trained, where = run_chat_template(src)
    if given is None:
        if trained:
            log(f"chat template: {trained} (data.chat_template of {where})")
        return trained
    if trained and given != trained:
        log(f"note: --chat-template {given!r} is not the template {src} trained with ({trained!r}, {where})")
    return given


def run_seq_len(src: str | pathlib.Path) -> tuple[int | None, str]:
    """(train.seq_len of SRC's run config.yaml, that file) or (None, "") when SRC is no run's."""
    train, cfg_file = run_section(src, "train")
    n = train.get("seq_len")
    return (n, cfg_file) if isinstance(n, int) and not isinstance(n, bool) else (None, "")


def tokenizer_path(src: str | pathlib.Path, override: str | None = None) -> str:
    """Where SRC's tokenizer is: --tokenizer, the HF dir's own files, or the run's config."""
    from jaxllm.training.checkpoint import is_hf_dir
    if override:
        return override
    path = pathlib.Path(src)
    if is_hf_dir(path):
        if (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists():
            return str(path)
        where = f"tokenizer.json or tokenizer.model in {path}"
    else:
        found, where = _run_dir_tokenizer(path)
        if found:
            if not pathlib.Path(found).exists():
                raise UserError(f"{src}: the tokenizer {found} ({where}) does not exist (relative paths "
                                f"are read from the current directory); pass --tokenizer PATH")
            return found
    raise UserError(f"{src} has no tokenizer (looked for {where}); pass --tokenizer PATH "
                    f"(a tokenizer.model, tokenizer.json or a directory holding one)")


_REWARD_MODEL = "{src} is a reward model (a scalar head, no LM head): generate/chat/eval need a language model"


def _is_reward_hf_dir(path: pathlib.Path) -> bool:
    """An HF *ForSequenceClassification dir (an exported reward model)."""
    import json

    from jaxllm.interop.hf import hf_head
    try:
        return hf_head(json.loads((path / "config.json").read_text())) == "reward"
    except (OSError, ValueError, AttributeError):
        return False   # not an HF dir, or a config.json that load_policy reports on


def load_model(src: str | pathlib.Path, tokenizer: str | None = None) -> Model:
    """(model config, params, tokenizer) of SRC; every expected failure is a one-line error."""
    from jaxllm.data.tokenizer import check_vocab, load_tokenizer
    from jaxllm.training.checkpoint import load_policy
    path = pathlib.Path(src)
    if not path.exists():
        raise UserError(f"{src} does not exist (give a run dir, a checkpoint dir or an HF model dir)")
    if _is_reward_hf_dir(path):   # before the tokenizer: no tokenizer would make it usable
        raise UserError(_REWARD_MODEL.format(src=src))
    tok_path = tokenizer_path(path, tokenizer)   # before the (slower) params, to fail fast
    try:
        tok = load_tokenizer(tok_path)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    params, saved, _ = load_policy(path)   # a LoRA/adapter run: its delta over its base
    if isinstance(params, dict) and "reward_head" in params and "lm_head" not in params:
        raise UserError(_REWARD_MODEL.format(src=src))
    if saved is None:
        raise UserError(f"{src}: the checkpoint holds no model config (meta item 'model')")
    cfg = model_config(saved, str(src))
    try:
        check_vocab(tok, cfg.vocab_size)
    except ValueError as e:
        raise UserError(f"{src}: {e}") from None
    return Model(cfg, params, tok, str(src))
