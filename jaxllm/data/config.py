"""Input configuration: which documents, which tokenizer, how they are packed into rows."""
from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "synthetic_tokens": a seeded token stream with learnable structure (no tokenizer; unit
    # tests and benchmarks). "text": documents -> sentencepiece -> grain packing.
    kind: Literal["synthetic_tokens", "text"] = "synthetic_tokens"
    seed: int = 0
