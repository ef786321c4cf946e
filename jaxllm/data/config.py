"""Input configuration: which documents, which tokenizer, how they are packed into rows.

A recipe states only what differs, e.g.

    data:
      kind: text
      tokenizer: data/tokenizer          # a dir holding tokenizer.model, or the .model file
      sources:
        - {path: "data/synth/train-*.jsonl", weight: 3}
        - {path: "data/wiki/*.parquet", text_field: body, weight: 1}
      eval_sources:
        - {path: "data/synth/eval-*.jsonl"}

SFT on conversations (see chat.py for the record formats and the loss mask):

    data:
      kind: chat
      tokenizer: checkpoints/qwen2.5-0.5b      # its tokenizer.json + chat_template, or ours
      sources: [{path: "data/synth/chat/train.jsonl"}]
      eval_sources: [{path: "data/synth/chat/eval.jsonl"}]
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Literal

SourceFormat = Literal["auto", "jsonl", "parquet", "text", "arrayrecord"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One set of files read the same way; a mixture is several of these with weights."""
    path: str = ""                    # a file, a directory (all files in it) or a glob
    format: SourceFormat = "auto"     # auto: by extension (.jsonl/.json, .parquet, .txt, .array_record)
    text_field: str = "text"          # JSONL key / Parquet column / ArrayRecord JSON key
    # Plain text only: "file" = each file is one document, "line" = each non-empty line is one.
    text_unit: Literal["file", "line"] = "file"
    weight: float = 1.0               # relative sampling weight in the mixture

    def __post_init__(self):
        if not self.path:
            raise ValueError("a data source needs 'path' (a file, directory or glob)")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"source '{self.path}': weight must be a positive number, got {self.weight}")


def _as_sources(items, key: str) -> tuple[SourceConfig, ...]:
    """configlib hands nested dataclasses inside tuples over as plain dicts; build them here
    with the same strictness (unknown keys name the closest valid key)."""
    valid = [f.name for f in dataclasses.fields(SourceConfig)]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, SourceConfig):
            out.append(item)
            continue
        if isinstance(item, str):           # shorthand: a bare path
            item = {"path": item}
        if not isinstance(item, dict):
            raise ValueError(f"{key}[{i}] must be a mapping like {{path: ..., weight: ...}}, got {item!r}")
        for k in item:
            if k not in valid:
                close = difflib.get_close_matches(str(k), valid, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown key '{key}[{i}].{k}'{hint} (valid keys: {valid})")
        fmt = item.get("format", "auto")
        if fmt not in SourceFormat.__args__:
            raise ValueError(f"{key}[{i}].format must be one of {list(SourceFormat.__args__)}, got {fmt!r}")
        if item.get("text_unit", "file") not in ("file", "line"):
            raise ValueError(f"{key}[{i}].text_unit must be 'file' or 'line', got {item['text_unit']!r}")
        try:
            item = dict(item, weight=float(item.get("weight", 1.0)))
        except (TypeError, ValueError):
            raise ValueError(f"{key}[{i}].weight must be a number, got {item['weight']!r}") from None
        out.append(SourceConfig(**item))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "synthetic_tokens": a seeded token stream with learnable structure (no tokenizer; unit
    # tests and benchmarks). "text": documents -> tokenizer -> grain packing. "chat":
    # conversations -> chat template -> tokens + loss mask (assistant turns only) -> packing.
    kind: Literal["synthetic_tokens", "text", "chat"] = "synthetic_tokens"
    seed: int = 0

    # --- kind: text and chat ----------------------------------------------------------------
    sources: tuple[SourceConfig, ...] = ()       # the training mixture
    eval_sources: tuple[SourceConfig, ...] = ()  # held-out documents, read once, in order
    # A .model file or a dir with tokenizer.model (SentencePiece), or a tokenizer.json or a
    # checkpoint dir holding one (HF tokenizers; needs the `hf` extra).
    tokenizer: str = ""
    # kind=text: bos/eos around each document. (kind=chat: the template decides; built-in
    # ChatML starts with bos when the tokenizer has one.)
    add_bos: bool = True
    add_eos: bool = True
    # kind=text: documents longer than this many characters are read, tokenized and packed in
    # pieces of at most this size (nothing is lost; counted in stats["doc_pieces"]), so memory
    # per record stays bounded. 0: no limit.
    max_doc_chars: int = 1_000_000
    # How tokenized documents are put into fixed-length rows (grain's packers). Documents
    # longer than a row are split into row-sized pieces first, never dropped.
    packing: Literal["first_fit", "best_fit"] = "first_fit"
    packing_bins: int = 8          # rows packed at once per shard; more bins -> less padding
    shuffle: bool = True           # reshuffle documents every epoch (seeded)
    # Logical shards: the fixed unit of parallel reading. Each shard is its own grain pipeline
    # and contributes global_batch_size/num_shards rows to every global batch, so the batch
    # sequence does not depend on how many processes share the shards. Must divide the
    # global batch size and be a multiple of the process count. 0: gcd(global_batch_size,
    # lcm(64, process count)), i.e. gcd(batch, 64) for any process count dividing 64 (the
    # same shards, so the same batches, on 1..64 such processes) and still valid past 64
    # processes or for counts like 3 (any count that divides the batch).
    num_shards: int = 0
    num_workers: int = 0           # grain mp_prefetch worker processes (0: read in-process)
    worker_buffer_size: int = 4    # batches each worker prefetches
    # Bad user data (malformed JSON, missing field, empty document, undecodable bytes):
    # False -> stop with an error naming file and line; True -> skip it, count it, warn.
    skip_bad_records: bool = False
    eval_batches: int = 0          # 0: the whole held-out set once (last batch padded)

    # --- kind: chat -------------------------------------------------------------------------
    # "": the tokenizer's own chat_template (an imported checkpoint's), else built-in ChatML;
    # "chatml"; or a Jinja template file / a tokenizer_config.json holding chat_template.
    chat_template: str = ""
    # Examples longer than a row: "truncate" drops the earliest turns (then cuts the prompt
    # from the left), always keeping the last assistant answer; "drop" leaves them out.
    long_examples: Literal["truncate", "drop"] = "truncate"
    # A bad chat record (no assistant turn, unknown role, non-string content, malformed JSON):
    # false -> skipped, counted, the first few printed at start-up; true -> an error naming it.
    # (kind=text reads skip_bad_records instead, strict by default.)
    strict: bool = False

    def __post_init__(self):
        object.__setattr__(self, "sources", _as_sources(self.sources, "data.sources"))
        object.__setattr__(self, "eval_sources", _as_sources(self.eval_sources, "data.eval_sources"))
        if self.kind in ("text", "chat") and not self.sources:
            raise ValueError(f"data.kind={self.kind} needs at least one entry in data.sources")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        only = {"chat": ("chat_template", "long_examples"), "text": ("add_bos", "add_eos", "max_doc_chars")}
        for kind, keys in only.items():
            changed = [k for k in keys if getattr(self, k) != defaults[k]]
            if changed and self.kind != kind:
                raise ValueError(f"data.{changed[0]} applies to data.kind={kind}, not {self.kind}; remove it"
                                 + (" (chat templates decide bos/eos: built-in ChatML starts with bos "
                                    "when the tokenizer has one)" if kind == "text" else ""))
        if self.long_examples not in ("truncate", "drop"):
            raise ValueError(f"data.long_examples must be 'truncate' or 'drop', got {self.long_examples!r}")
        if self.strict and self.skip_bad_records:
            raise ValueError("data.strict=true and data.skip_bad_records=true contradict each other")
        if self.max_doc_chars and self.max_doc_chars < 64:
            raise ValueError(f"data.max_doc_chars must be 0 (no limit) or at least 64, got {self.max_doc_chars}")
        if self.packing_bins < 1:
            raise ValueError(f"data.packing_bins must be >= 1, got {self.packing_bins}")
        if self.num_shards < 0 or self.num_workers < 0 or self.eval_batches < 0:
            raise ValueError("data.num_shards, data.num_workers and data.eval_batches must be >= 0")
        if self.worker_buffer_size < 1:
            raise ValueError(f"data.worker_buffer_size must be >= 1, got {self.worker_buffer_size}")

    def shard_count(self, global_batch_size: int, process_count: int = 1) -> int:
        return self.num_shards or math.gcd(global_batch_size, math.lcm(64, process_count))
