"""A seeded synthetic token stream with learnable structure, needing no tokenizer.

Each document is [BOS, x0, x1, ...] with x_k = (a + k*s) mod (V-3) + 2 (id V-1 is left free
for the MLM mask): after two tokens the
rest is determined, so a model that learns the rule drives loss towards zero. Documents of
random length are packed into rows with segment_ids/positions exactly like the text pipeline,
so unit tests and benchmarks exercise packing without a tokenizer.

Global batch `i` is a pure function of (seed, i); a process takes its slice of rows, so the
global batch sequence does not depend on the process count. Built on grain so its iterator
state checkpoints like the real pipeline's.
"""
from __future__ import annotations

import grain
import numpy as np

from jaxllm.data import layout

BOS = 1


def synthetic_row(seed: int, index: int, seq_len: int, vocab_size: int, max_doc: int = 48):
    rng = np.random.default_rng([seed, index])
    tokens = np.zeros(seq_len, np.int32)
    seg = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    t, doc = 0, 0
    while t < seq_len - 3:
        n = int(min(rng.integers(8, max_doc + 1), seq_len - t))
        a, s = rng.integers(0, vocab_size - 2), rng.integers(1, 8)
        doc += 1
        tokens[t] = BOS
        tokens[t + 1:t + n] = (a + s * np.arange(n - 1)) % (vocab_size - 3) + 2  # V-1 stays free (MLM mask)
        seg[t:t + n], pos[t:t + n] = doc, np.arange(n)
        t += n
    return {"tokens": tokens, "positions": pos, "segment_ids": seg,
            "loss_mask": (seg != 0).astype(np.int32)}


def synthetic_batches(*, seq_len: int, global_batch_size: int, vocab_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1, split: str = "train",
                      num_batches: int | None = None):
    """grain iterator over this process's rows of each global batch (infinite for train)."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} processes")
    local = global_batch_size // process_count
    lo = process_index * local
    offset = 0 if split == "train" else 1 << 40   # held-out rows never seen in training

    def make(i):
        rows = [synthetic_row(seed, offset + int(i) * global_batch_size + lo + r, seq_len, vocab_size)
                for r in range(local)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    n = num_batches if num_batches is not None else 1 << 40
    # every process holds the global batch index: restorable on any process count
    return layout.global_index(iter(grain.MapDataset.range(n).map(make).to_iter_dataset()))
