"""SentencePiece tokenizers: train one on documents, load ours or an HF Llama-style one.
(`load_tokenizer` also opens an HF tokenizer.json: see hf_tokenizer.py.)

Trained models reserve fixed ids so every tokenizer we make agrees on them:
    pad=0  unk=1  bos=2  eos=3  <|im_start|>=4  <|im_end|>=5  <mask>=6
Byte fallback is on (no input is ever <unk>, 256 byte pieces are added), digits are split
one per piece (arithmetic tokenizes consistently), and normalisation is the identity so
decode(encode(text)) == text. Chat markers are user-defined symbols: always a single piece.
"""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from jaxllm.data.sources import check_utf8

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
MASK_TOKEN = "<mask>"   # MLM corruption symbol; never produced by encoding text
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """A loaded SentencePiece model plus the ids the data pipeline needs."""

    def __init__(self, model_proto: bytes, path: str = "<memory>"):
        self.path = path
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        # HF Llama tokenizers define no pad (-1); padded cells are masked out anyway, so any
        # valid id works: take unk, as Llama recipes commonly do.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.unk_id, 0)
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: tokenizer defines no bos/eos piece (bos={self.bos_id}, "
                             f"eos={self.eos_id}); documents need both to be packed")
        self.special_ids: dict[str, int] = {}
        for piece in CHAT_TOKENS + (MASK_TOKEN,):
            i = self.sp.piece_to_id(piece)
            if i != self.unk_id:
                self.special_ids[piece] = i
        self.im_start_id: int | None = self.special_ids.get("<|im_start|>")
        self.im_end_id: int | None = self.special_ids.get("<|im_end|>")
        self.mask_id: int | None = self.special_ids.get(MASK_TOKEN)
        # None: built-in ChatML; load_tokenizer sets the template of a tokenizer_config.json /
        # chat_template.jinja beside the model (an HF Llama-2-style dir, or a jaxllm HF export)
        self.chat_template: str | None = None
        # Control pieces are not parsed from text by SentencePiece; a Jinja template may write
        # them as text ({{ bos_token }}), so encode_with_offsets maps their text to their ids.
        self._control_text = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id)}
        self._sp_render = None  # built on first use: see encode_with_offsets

    # SentencePieceProcessor does not pickle; grain worker processes need a copy of us.
    def __getstate__(self):
        return {"model_proto": self._proto, "path": self.path, "chat_template": self.chat_template}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["path"])
        self.chat_template = state.get("chat_template")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               continues: bool = False) -> list[int]:
        """`continues`: the text goes on from an earlier piece of the same document, so no
        dummy-prefix "▁" is put before it (a piece cut before a space then gets the tokens it
        has inside the whole document)."""
        sp = self._renderer() if continues else self.sp
        return sp.encode(text, out_type=int, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """ids of `text` (which may hold special-token text: a rendered chat template) and the
        character offset at which each token starts. Unlike `encode`, no dummy-prefix "▁" is
        put before the text: a rendering is not a document."""
        ids, starts, pos = [], [], 0
        controls = re.finditer("|".join(map(re.escape, self._control_text)), text)
        for m in [*controls, None]:
            end = m.start() if m else len(text)
            if end > pos:
                raw = np.frombuffer(text[pos:end].encode("utf-8"), np.uint8)
                # character index of each byte (a continuation byte: its character's)
                char_of = np.append(np.cumsum((raw & 0xC0) != 0x80) - 1, -1)
                for piece in self._renderer().encode(text[pos:end], return_type="proto").pieces:
                    ids.append(piece.id)
                    starts.append(pos + int(char_of[piece.begin]) if piece.begin < len(raw) else end)
            if m:
                ids.append(self._control_text[m.group()])
                starts.append(m.start())
                pos = m.end()
        return ids, starts

    def _renderer(self) -> spm.SentencePieceProcessor:
        if self._sp_render is None:
            from sentencepiece import sentencepiece_model_pb2  # protobuf: grain/orbax need it too
            m = sentencepiece_model_pb2.ModelProto()
            m.ParseFromString(self._proto)
            m.normalizer_spec.add_dummy_prefix = False
            self._sp_render = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
        return self._sp_render

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike):
    """`path` is a .model file or a directory holding tokenizer.model (SentencePiece: ours or an
    HF Llama-2-style checkpoint's), or a tokenizer.json file or a directory holding one (an HF
    fast tokenizer, e.g. Qwen2's or Llama 3's: an `HFTokenizer`). A directory with both is read
    through tokenizer.json, as transformers does."""
    p = pathlib.Path(path)
    if (p.is_dir() and (p / "tokenizer.json").exists()) or (p.suffix == ".json" and p.is_file()):
        from jaxllm.data.hf_tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(p)
    if p.is_dir():
        model = p / "tokenizer.model"
        if not model.exists():
            found = sorted(x.name for x in p.iterdir())[:12]
            raise FileNotFoundError(f"{p}: neither tokenizer.model nor tokenizer.json in this directory; "
                                    f"found {found}. Train one with `jaxllm tokenizer train`.")
        p = model
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p} (give a .model file, a tokenizer.json or a "
                                f"directory holding one; make one with `jaxllm tokenizer train "
                                f"--input FILES --vocab-size N --out DIR`)")
    proto = p.read_bytes()
    try:
        tok = Tokenizer(proto, str(p))
    except RuntimeError as e:
        raise ValueError(f"{p}: not a valid SentencePiece model ({e})") from None
    config_file = p.parent / "tokenizer_config.json"
    if config_file.exists() or (p.parent / "chat_template.jinja").exists():   # the dir's own template
        import json

        from jaxllm.data.hf_tokenizer import chat_template_of
        try:
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: malformed JSON ({e.msg} at line {e.lineno})") from None
        tok.chat_template = chat_template_of(config, p.parent, str(config_file))
    return tok


def fingerprint(tokenizer) -> str:
    """What identifies a tokenizer's behaviour (a hash of its model bytes), for caches."""
    data = getattr(tokenizer, "_proto", None) or getattr(tokenizer, "_json", None)
    if data is None:
        return f"{type(tokenizer).__name__}@{id(tokenizer)}"
    return hashlib.sha1(data if isinstance(data, bytes) else data.encode()).hexdigest()


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Fail at start-up, not with an index error mid-run, if ids can exceed the embedding."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size {model_vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} pieces, {tokenizer.path}): token ids up to "
            f"{tokenizer.vocab_size - 1} would index past the embedding table. Set "
            f"model.vocab_size >= {tokenizer.vocab_size} (a multiple of 128 is usual).")


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, *,
                    model_type: str = "bpe", seed: int = 0, max_sentences: int = 2_000_000,
                    num_threads: int | None = None) -> Tokenizer:
    """Train on `texts` (documents; split into lines, as SentencePiece learns from sentences)
    and write out_dir/tokenizer.model (+ tokenizer.vocab). Same texts and seed -> the same bytes."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    specials = 4 + len(CHAT_TOKENS) + 1  # pad/unk/bos/eos, chat markers, <mask>
    minimum = 256 + specials
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 256 "
                         f"pieces plus {specials} special ones; use at least {minimum} "
                         f"(and enough to hold the corpus's characters)")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # SentencePiece would turn an error raised while reading (e.g. a bad JSONL line) into an
    # opaque RuntimeError; stop feeding instead and re-raise the original afterwards.
    read_error: list[Exception] = []

    def sentences():
        try:
            for k, doc in enumerate(texts):
                # An unpaired surrogate would make SentencePiece fail with a bare RuntimeError.
                check_utf8(doc, f"training text {k + 1}")
                for line in doc.split("\n"):
                    if line.strip():
                        yield line
        except Exception as e:  # noqa: BLE001 - re-raised unchanged below
            read_error.append(e)

    spm.set_random_generator_seed(seed)
    # Train into memory: with model_prefix the output path is stored inside the model, and
    # two trainings on the same data would differ in bytes.
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=writer,
            model_type=model_type, vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=list(CHAT_TOKENS) + [MASK_TOKEN], character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=num_threads or min(8, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        if read_error:
            raise read_error[0] from None
        # SentencePiece reports e.g. "Vocabulary size too high (4000). Please set it to a value
        # <= 1431." behind a C++ source location; keep the part a user can act on.
        m = re.search(r"Vocabulary size.*", str(e))
        if m:
            raise ValueError(f"cannot train a {vocab_size}-piece {model_type} tokenizer on this "
                             f"corpus: {m.group(0).strip()}") from None
        raise
    if read_error:
        raise read_error[0]
    (out / "tokenizer.model").write_bytes(writer.getvalue())
    tok = load_tokenizer(out / "tokenizer.model")
    (out / "tokenizer.vocab").write_text(
        "".join(f"{tok.id_to_piece(i)}\t{tok.sp.get_score(i)}\n" for i in range(tok.vocab_size)),
        encoding="utf-8")
    return tok
