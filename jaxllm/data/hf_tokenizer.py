"""Tokenizers of imported checkpoints: an HF `tokenizer.json` through the `tokenizers` library.

A Qwen2 or Llama-3 checkpoint directory holds `tokenizer.json` (the fast tokenizer: vocabulary,
merges, added tokens) and `tokenizer_config.json` beside it (which added tokens are bos/eos/pad,
and the Jinja `chat_template`; newer checkpoints keep the template in `chat_template.jinja`).
`HFTokenizer` offers the same interface as the SentencePiece `Tokenizer`, so the data pipeline,
the chat renderer and generation do not care which one they hold.

`tokenizers` and `jinja2` are the optional `hf` extra: nothing imports them until an HF
tokenizer or a Jinja template is used, and then a missing one is one line naming the extra.
"""
from __future__ import annotations

import importlib
import json
import pathlib
from typing import Iterable, Sequence

from jaxllm.data.tokenizer import MASK_TOKEN
from jaxllm.errors import UserError

EXTRA_HINT = "pip install 'jaxllm[hf]'"


class MissingExtra(UserError):
    """An optional dependency is not installed; the message names the pip extra."""


def require(module: str, what: str):
    """Import an optional dependency or say, in one line, how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs the '{module}' package, which is not installed: "
                           f"{EXTRA_HINT}") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string, as an AddedToken dict
    ({"content": ...}) or as null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def chat_template_of(config: dict, directory: pathlib.Path, where: str) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    # A list of named templates ({"name": "default", "template": ...}, "tool_use", ...):
    # training renders plain conversations, i.e. the default one.
    named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
    if "default" not in named:
        raise ValueError(f"{where}: chat_template lists templates {sorted(map(str, named))} but "
                         f"none is named 'default'; set data.chat_template to a template file")
    return named["default"]


class HFTokenizer:
    """`tokenizers.Tokenizer` from a tokenizer.json, plus the ids and template of its config.

    bos_id/unk_id are None when the checkpoint defines none (Qwen2 has no bos, byte-level BPE
    no unk). pad_id: the config's pad token, else unk, else eos (padded cells are masked out).
    """

    def __init__(self, tokenizer_json: str, config: dict | None = None, path: str = "<memory>",
                 chat_template: str | None = None):
        lib = require("tokenizers", f"the HF tokenizer {path}")
        self.path = path
        self._json, self._config = tokenizer_json, dict(config or {})
        self.hf = lib.Tokenizer.from_str(tokenizer_json)
        self.chat_template: str | None = chat_template
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1

        def token_id(key: str) -> int | None:
            text = _token_text(self._config.get(key))
            if text is None:
                return None
            i = self.hf.token_to_id(text)
            if i is None:
                raise ValueError(f"{path}: tokenizer_config.json names {key}={text!r}, which is not "
                                 f"in the vocabulary of tokenizer.json")
            return i

        self.bos_id, self.eos_id = token_id("bos_token"), token_id("eos_token")
        self.unk_id = token_id("unk_token")
        pad = token_id("pad_token")
        self.pad_id: int = next((i for i in (pad, self.unk_id, self.eos_id) if i is not None), 0)
        self.special_ids: dict[str, int] = {t.content: i for i, t in
                                            sorted(self.hf.get_added_tokens_decoder().items()) if t.special}
        self.im_start_id: int | None = self.special_ids.get("<|im_start|>")
        self.im_end_id: int | None = self.special_ids.get("<|im_end|>")
        self.mask_id: int | None = self.special_ids.get(MASK_TOKEN)

    # The Rust tokenizer pickles, but the state below is what defines us; keep it explicit.
    def __getstate__(self):
        return {"json": self._json, "config": self._config, "path": self.path,
                "chat_template": self.chat_template}

    def __setstate__(self, state):
        self.__init__(state["json"], state["config"], state["path"], state["chat_template"])

    def token_text(self, i: int | None) -> str | None:
        return None if i is None else self.hf.id_to_token(int(i))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               continues: bool = False) -> list[int]:
        # add_special_tokens=False: the post-processor (e.g. Llama-3's automatic bos) stays off,
        # bos/eos are added here on request only. Special-token text in `text` becomes its id,
        # as in transformers. `continues` (a later piece of a document) changes nothing for
        # byte-level BPE, which adds no prefix space.
        del continues
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return _with_bos_eos(self, ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        del num_threads  # the Rust tokenizer parallelises by itself
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """ids of `text` (special-token text included, e.g. a rendered chat template) and the
        character offset at which each token starts."""
        enc = self.hf.encode(text, add_special_tokens=False)
        return list(enc.ids), [s for s, _ in enc.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.hf.id_to_token(int(i))

    def __repr__(self):
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _with_bos_eos(tok, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
    for flag, name, i in ((add_bos, "bos", tok.bos_id), (add_eos, "eos", tok.eos_id)):
        if flag and i is None:
            raise ValueError(f"{tok.path}: the tokenizer defines no {name} token (tokenizer_config.json "
                             f"{name}_token); set data.add_{name}=false")
    return ([tok.bos_id] if add_bos else []) + list(ids) + ([tok.eos_id] if add_eos else [])


def load_hf_tokenizer(path: str | pathlib.Path) -> HFTokenizer:
    """A tokenizer.json file, or a checkpoint directory holding one (tokenizer_config.json and
    chat_template.jinja beside it are read when present)."""
    p = pathlib.Path(path)
    directory, file = (p, p / "tokenizer.json") if p.is_dir() else (p.parent, p)
    config_file = directory / "tokenizer_config.json"
    config = {}
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: malformed JSON ({e.msg} at line {e.lineno})") from None
    text = file.read_text(encoding="utf-8")
    try:
        return HFTokenizer(text, config, str(file), chat_template_of(config, directory, str(config_file)))
    except Exception as e:  # the Rust side raises a bare Exception on a malformed file
        if isinstance(e, (MissingExtra, ValueError)):
            raise
        raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
