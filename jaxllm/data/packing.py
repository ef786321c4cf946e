"""Documents -> token arrays -> fixed-length packed rows in the batch schema.

The stages, each a grain transformation applied per logical shard (see pipeline.py):
  read       DocRef -> the document's text in pieces of at most data.max_doc_chars
             characters (doc_pieces.py; one piece unless the document is longer)   (ReadPieces)
  tokenize   piece -> {"tokens": [bos] + ids + [eos], "note": DOC}  (bos on a document's first
             piece only, eos on its last)                                       (map, 1:1)
  split      a piece longer than a row -> row-sized pieces                  (FlatMap, counted)
  pack       grain's FirstFit/BestFit packer fills rows with whole pieces, giving each its own
             segment id and positions 0..len-1, padding only what no piece fits into
  to_row     grain's packed features -> tokens/positions/segment_ids/loss_mask (int32, (T,))

Why the schema is what it is: segment ids separate documents so attention never crosses them;
positions restart per document so rotary embeddings see each as if alone; loss_mask says which
tokens are targets (all real tokens of a document; chat.py's elements bring their own mask,
packed alongside the tokens). A split document's later pieces start a new segment at position
0: they cannot see the earlier piece anyway.

Bookkeeping rides along as the packer's non-sequence meta feature "note" (one per packed
element) and leaves as a per-row "_stats" count of each note (STATS_NAMES) that the pipeline
sums and strips before batches reach the model.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import grain
import numpy as np

from jaxllm.data.sources import DataError, Doc

# Values of the "note" meta feature, and the iterator stats they are summed into.
DOC, PIECE, SKIPPED, DOC_PIECE, TRUNCATED, DROPPED = range(6)
STATS_NAMES = ("documents", "split_pieces", "skipped_records", "doc_pieces", "truncated_examples",
               "dropped_examples")
STATS_KEY = "_stats"            # per-row int64 count of each note
BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
ROW_PREFETCH = 64               # row-sized pieces read ahead per shard (bounds memory and work)
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


class DocRef(NamedTuple):
    """Record `index` of `source`, not yet read: the text stage reads it in pieces."""
    source: Any
    index: int

    @property
    def where(self) -> str:
        return self.source.where(self.index) if hasattr(self.source, "where") else f"record {self.index}"


class LazyDocs:
    """A source as a grain data source of DocRefs: shuffling, mixing and sharding move indices
    only, and each document is read where it is tokenized, piece by piece."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index: int) -> DocRef:
        return DocRef(self.source, index)


class Piece(NamedTuple):
    text: str
    where: str
    first: bool   # the document's first piece: gets bos, counts as a document
    last: bool    # its last piece: gets eos


class ReadPieces(grain.IterDataset):
    """DocRef -> the document's Pieces (at most `max_chars` characters each; 0: whole), read
    lazily; Doc/Bad elements (already read) are cut or passed on. Bad records raise, or with
    `skip` become a Bad element that is counted (a record that goes bad after some pieces keeps
    those and is counted as skipped for the rest)."""

    def __init__(self, parent, max_chars: int, skip: bool, max_warnings: int = 20):
        super().__init__(parent)
        self.max_chars, self.skip, self.max_warnings = max_chars, skip, max_warnings

    def __iter__(self):
        return _ReadPiecesIterator(self._parent.__iter__(), self)


class _ReadPiecesIterator(grain.DatasetIterator):
    def __init__(self, parent, cfg: ReadPieces):
        super().__init__(parent)
        self._cfg, self._warned = cfg, 0
        self._pieces = None                      # iterator over the current record's pieces
        self._before = parent.get_state()        # parent state before the current record
        self._done = 0                           # pieces of it already handed on

    def _open(self, element, start: int):
        if isinstance(element, Bad):
            return iter([element] if start == 0 else [])
        limit = self._cfg.max_chars or (1 << 62)
        if isinstance(element, Doc):
            from jaxllm.data.doc_pieces import text_pieces
            texts, where = text_pieces(element.text, limit, start), element.where
        elif hasattr(element.source, "read_pieces"):
            texts, where = element.source.read_pieces(element.index, limit, start), element.where
        else:  # a plain list of Docs (tests)
            return self._open(element.source[element.index], start)
        return self._label(texts, where, start)

    @staticmethod
    def _label(texts, where: str, start: int):
        k, prev = start, None
        for text in texts:
            if prev is not None:
                yield Piece(prev, where, k == 0, False)
                k += 1
            prev = text
        if prev is not None:
            yield Piece(prev, where, k == 0, True)

    def __next__(self):
        self._assert_not_closed()
        while True:
            if self._pieces is None:
                self._before = self._parent.get_state()
                self._pieces, self._done = self._open(next(self._parent), 0), 0
            try:
                piece = next(self._pieces)
            except StopIteration:
                self._pieces = None
                continue
            except DataError as e:
                if not self._cfg.skip:
                    raise
                if self._warned < self._cfg.max_warnings:
                    self._warned += 1
                    _log.warning("skipping bad record (skip_bad_records=true)%s: %s",
                                 f" after {self._done} pieces" if self._done else "", e)
                self._pieces = None  # the record is finished: a restore resumes after it
                return Bad(*str(e).split(": ", 1)) if ": " in str(e) else Bad("?", str(e))
            self._done += 1
            return piece

    def get_state(self):
        if self._pieces is None:
            return {"parent": self._parent.get_state(), "done": 0}
        return {"parent": self._before, "done": self._done}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._before, self._done, self._pieces = state["parent"], state["done"], None
        if self._done:
            self._pieces = self._open(next(self._parent), self._done)


class Tokenize:
    """Piece -> {"tokens": int32 [bos] + ids + [eos], "note"}; Bad -> an empty element."""

    def __init__(self, tokenizer, add_bos: bool = True, add_eos: bool = True):
        self.tok, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

    def __call__(self, piece: Piece | Doc | Bad) -> dict:
        if isinstance(piece, Bad):
            # Kept (not filtered) so this stage stays 1:1, which keeps worker-count invariance;
            # an empty element packs into no cells and is counted from its note.
            return {"tokens": np.zeros((0,), np.int32), "note": SKIPPED}
        first, last = (piece.first, piece.last) if isinstance(piece, Piece) else (True, True)
        ids = self.tok.encode(piece.text, add_bos=self.add_bos and first, add_eos=self.add_eos and last,
                              continues=not first)
        return {"tokens": np.asarray(ids, np.int32), "note": DOC if first else DOC_PIECE}


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
        return [{"tokens": toks[i:i + self.seq_len], "note": element["note"] if i == 0 else PIECE}
                for i in range(0, len(toks), self.seq_len)]


def pack(ds: grain.IterDataset, *, seq_len: int, mode: str, num_bins: int, seed: int,
         pad_id: int, shuffle_bins: bool = True, with_mask: bool = False) -> grain.IterDataset:
    """grain's first-fit or best-fit packer over elements no longer than `seq_len`, then our
    schema. `with_mask`: elements carry their own "loss_mask", packed like the tokens (same
    lengths, so the same cells)."""
    cls = {"first_fit": grain.experimental.FirstFitPackIterDataset,
           "best_fit": grain.experimental.BestFitPackIterDataset}[mode]
    lengths, padding = {"tokens": seq_len}, {"tokens": pad_id}
    if with_mask:
        lengths["loss_mask"], padding["loss_mask"] = seq_len, 0
    packed = cls(ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
                 shuffle_bins=shuffle_bins, meta_features=("note",), padding_struct=padding)
    return packed.map(to_row)


def to_row(packed: dict) -> dict:
    """grain's packed element -> our schema (+ the "_stats" bookkeeping row)."""
    seg = packed["tokens_segment_ids"]
    # Skipped records are empty elements that still consumed a segment id; renumber so a
    # row's documents are exactly 1..k (0 stays padding: it is the smallest id).
    uniq, seg = np.unique(seg, return_inverse=True)
    if uniq[0] != 0:
        seg = seg + 1
    seg = seg.astype(np.int32)
    mask = seg != 0
    if "loss_mask" in packed:
        mask &= packed["loss_mask"] != 0
    notes = np.asarray(list(packed["note"]), np.int64)
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "positions": packed["tokens_positions"].astype(np.int32),
        "segment_ids": seg,
        "loss_mask": mask.astype(np.int32),
        STATS_KEY: np.bincount(notes, minlength=len(STATS_NAMES)).astype(np.int64),
    }


def empty_row(seq_len: int, pad_id: int) -> dict:
    """All padding: fills the last eval batch; every mask is zero so it changes no metric."""
    z = np.zeros((seq_len,), np.int32)
    return {"tokens": np.full((seq_len,), pad_id, np.int32), "positions": z, "segment_ids": z,
            "loss_mask": z, STATS_KEY: np.zeros((len(STATS_NAMES),), np.int64)}


def packed_rows(docs: grain.MapDataset, tokenizer, *, seq_len: int, mode: str, num_bins: int,
                seed: int, add_bos: bool = True, add_eos: bool = True, shuffle_bins: bool = True,
                max_doc_chars: int = 0, skip_bad_records: bool = False) -> grain.IterDataset:
    """The whole per-shard text chain: MapDataset of DocRef (or Doc/Bad) -> IterDataset of rows
    in our schema. Reading and tokenizing run in a thread ahead of the packer; what it holds
    is ROW_PREFETCH row-sized pieces plus one document piece, whatever the documents' sizes."""
    ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ReadPieces(ds, max_doc_chars, skip_bad_records).map(Tokenize(tokenizer, add_bos, add_eos))
    ds = grain.experimental.FlatMapIterDataset(ds, SplitLong(seq_len))
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=ROW_PREFETCH)
    return pack(ds, seq_len=seq_len, mode=mode, num_bins=num_bins, seed=seed, pad_id=tokenizer.pad_id,
                shuffle_bins=shuffle_bins)
