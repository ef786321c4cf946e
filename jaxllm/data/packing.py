"""Documents -> token arrays -> fixed-length packed rows in the batch schema.

The stages, each a grain transformation applied per logical shard (see pipeline.py):
  tokenize   Doc -> {"tokens": [bos] + ids + [eos], "note": DOC}     (MapDataset.map, 1:1)
  split      a document longer than a row -> row-sized pieces          (FlatMap, counted)
  pack       grain's FirstFit/BestFit packer fills rows with whole pieces, giving each its own
             segment id and positions 0..len-1, padding only what no piece fits into
  to_row     grain's packed features -> tokens/positions/segment_ids/loss_mask (int32, (T,))

Why the schema is what it is: segment ids separate documents so attention never crosses them;
positions restart per document so rotary embeddings see each as if alone; loss_mask says which
tokens are targets (all real tokens here; SFT will mask prompts). A split document's later
pieces start a new segment at position 0: they cannot see the earlier piece anyway.

Bookkeeping rides along as the packer's non-sequence meta feature "note" (one per packed
element) and leaves as a per-row "_stats" [documents, split pieces, skipped records] that the
pipeline sums and strips before batches reach the model.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import grain
import numpy as np

from jaxllm.data.sources import DataError, Doc

DOC, PIECE, SKIPPED = 0, 1, 2   # values of the "note" meta feature
STATS_KEY = "_stats"            # per-row int64 [docs, split pieces, skipped records]
BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
_log = logging.getLogger(__name__)


class Bad(NamedTuple):
    """A record that failed validation and is being skipped (skip_bad_records=True)."""
    where: str
    message: str


class GuardedSource:
    """Wraps a source so bad records raise (default) or come back as `Bad` to be counted.

    Raising happens inside whichever grain worker reads the record; grain re-raises it in the
    main process, and the message already names file and line.
    """

    def __init__(self, source, skip_bad_records: bool, max_warnings: int = 20):
        self.source, self.skip, self.max_warnings = source, skip_bad_records, max_warnings
        self._warned = 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return self.source[index]
        except DataError as e:
            if not self.skip:
                raise
            if self._warned < self.max_warnings:
                self._warned += 1
                _log.warning("skipping bad record (skip_bad_records=true): %s", e)
            return Bad(*str(e).split(": ", 1)) if ": " in str(e) else Bad("?", str(e))


class Tokenize:
    """Doc -> {"tokens": int32 [bos] + ids + [eos], "note": DOC}; Bad -> an empty element."""

    def __init__(self, tokenizer, add_bos: bool = True, add_eos: bool = True):
        self.tok, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

    def __call__(self, doc: Doc | Bad) -> dict:
        if isinstance(doc, Bad):
            # Kept (not filtered) so this stage stays 1:1, which keeps worker-count invariance;
            # an empty element packs into no cells and is counted from its note.
            return {"tokens": np.zeros((0,), np.int32), "note": SKIPPED}
        ids = self.tok.encode(doc.text, add_bos=self.add_bos, add_eos=self.add_eos)
        return {"tokens": np.asarray(ids, np.int32), "note": DOC}


class SplitLong(grain.experimental.FlatMapTransform):
    """Cut a document longer than a row into row-sized pieces (the packers reject, and we
    never drop, anything longer)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.max_fan_out = 1 << 20  # unused by the IterDataset flat map; documents may be long

    def flat_map(self, element: dict) -> list[dict]:
        toks = element["tokens"]
        if len(toks) <= self.seq_len:
            return [element]
        return [{"tokens": toks[i:i + self.seq_len], "note": DOC if i == 0 else PIECE}
                for i in range(0, len(toks), self.seq_len)]


def pack(ds: grain.IterDataset, *, seq_len: int, mode: str, num_bins: int, seed: int,
         pad_id: int, shuffle_bins: bool = True) -> grain.IterDataset:
    """grain's first-fit or best-fit packer over elements no longer than `seq_len`."""
    cls = {"first_fit": grain.experimental.FirstFitPackIterDataset,
           "best_fit": grain.experimental.BestFitPackIterDataset}[mode]
    return cls(ds, length_struct={"tokens": seq_len}, num_packing_bins=num_bins, seed=seed,
               shuffle_bins=shuffle_bins, meta_features=("note",), padding_struct={"tokens": pad_id})


def to_row(packed: dict) -> dict:
    """grain's packed element -> our schema (+ the "_stats" bookkeeping row)."""
    seg = packed["tokens_segment_ids"]
    # Skipped records are empty elements that still consumed a segment id; renumber so a
    # row's documents are exactly 1..k (0 stays padding: it is the smallest id).
    uniq, seg = np.unique(seg, return_inverse=True)
    if uniq[0] != 0:
        seg = seg + 1
    seg = seg.astype(np.int32)
    notes = np.asarray(list(packed["note"]), np.int64)
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "positions": packed["tokens_positions"].astype(np.int32),
        "segment_ids": seg,
        "loss_mask": (seg != 0).astype(np.int32),
        STATS_KEY: np.array([(notes == DOC).sum(), (notes == PIECE).sum(), (notes == SKIPPED).sum()],
                            np.int64),
    }


def empty_row(seq_len: int, pad_id: int) -> dict:
    """All padding: fills the last eval batch; every mask is zero so it changes no metric."""
    z = np.zeros((seq_len,), np.int32)
    return {"tokens": np.full((seq_len,), pad_id, np.int32), "positions": z, "segment_ids": z,
            "loss_mask": z, STATS_KEY: np.zeros((3,), np.int64)}


def packed_rows(docs: grain.MapDataset, tokenizer, *, seq_len: int, mode: str, num_bins: int,
                seed: int, add_bos: bool = True, add_eos: bool = True, shuffle_bins: bool = True,
                read_threads: int = 1) -> grain.IterDataset:
    """The whole per-shard chain: Doc MapDataset -> IterDataset of rows in our schema."""
    ds = docs.map(Tokenize(tokenizer, add_bos, add_eos)).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    ds = grain.experimental.FlatMapIterDataset(ds, SplitLong(seq_len))
    ds = pack(ds, seq_len=seq_len, mode=mode, num_bins=num_bins, seed=seed,
              pad_id=tokenizer.pad_id, shuffle_bins=shuffle_bins)
    return ds.map(to_row)
