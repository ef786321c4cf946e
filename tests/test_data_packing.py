"""Packing: row masks, per-document positions, nothing dropped, splits counted, padding minimal."""
import collections
import math
import random

import grain
import numpy as np
import pytest

from jaxllm.data import packing, synthetic
from jaxllm.data.packing import GuardedSource, packed_rows
from jaxllm.data.sources import DataError, Doc
from jaxllm.data.tokenizer import train_tokenizer

DOCS = list(synthetic.pretrain_docs(300, seed=5))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(synthetic.pretrain_docs(1500, seed=3), tmp_path_factory.mktemp("tok"), 400)


def _rows(tok, docs, *, seq_len, mode="first_fit", bins=4, shuffle_bins=True, skip=False):
    if isinstance(docs, list):
        docs = [Doc(d, f"doc:{i}") for i, d in enumerate(docs)]
    src = GuardedSource(docs, skip)
    ds = packed_rows(grain.MapDataset.source(src), tok, seq_len=seq_len, mode=mode, num_bins=bins,
                     seed=1, shuffle_bins=shuffle_bins)
    it = iter(ds)
    rows = list(it)
    it.close()
    return rows


def _segments(row):
    """Row -> list of (segment id, token tuple)."""
    out = []
    for s in range(1, row["segment_ids"].max() + 1):
        out.append(tuple(row["tokens"][row["segment_ids"] == s].tolist()))
    return out


def assert_row_invariants(row, pad_id):
    seg, pos = row["segment_ids"], row["positions"]
    n_real = int((seg != 0).sum())
    # Documents first, padding only at the end of the row.
    assert (seg[:n_real] != 0).all() and (seg[n_real:] == 0).all()
    # Segment ids are 1, 2, 3, ... in order, each a contiguous block.
    changes = np.flatnonzero(np.diff(seg[:n_real])) + 1
    starts = np.concatenate([[0], changes]) if n_real else np.zeros(0, int)
    assert seg[:n_real].tolist() == sorted(seg[:n_real].tolist())
    assert [int(seg[s]) for s in starts] == list(range(1, len(starts) + 1))
    # Positions restart at 0 at every document start and count up by one inside it.
    for a, b in zip(starts, list(starts[1:]) + [n_real]):
        assert pos[a:b].tolist() == list(range(b - a))
    assert (pos[n_real:] == 0).all()
    assert (row["tokens"][n_real:] == pad_id).all()
    # Pretraining: every real token is a target, padding never is.
    assert (row["loss_mask"] == (seg != 0)).all()
    for k in packing.BATCH_KEYS:
        assert row[k].dtype == np.int32


@pytest.mark.parametrize("mode", ["first_fit", "best_fit"])
def test_rows_are_well_formed_and_nothing_is_dropped(tok, mode):
    T = 128
    rows = _rows(tok, DOCS, seq_len=T, mode=mode)
    for r in rows:
        assert_row_invariants(r, tok.pad_id)
    # The multiset of packed segments is exactly the multiset of row-sized pieces of the
    # tokenized documents: no document dropped, truncated or duplicated.
    expected = collections.Counter()
    n_splits = 0
    for d in DOCS:
        ids = tok.encode(d, add_bos=True, add_eos=True)
        pieces = [tuple(ids[i:i + T]) for i in range(0, len(ids), T)]
        expected.update(pieces)
        n_splits += len(pieces) - 1
    got = collections.Counter(s for r in rows for s in _segments(r))
    assert got == expected
    assert n_splits > 50  # the corpus has long documents: splitting is really exercised
    stats = np.sum([r[packing.STATS_KEY] for r in rows], axis=0)
    assert stats.tolist() == [len(DOCS), n_splits, 0, 0, 0, 0]


def test_split_pieces_carry_bos_only_at_document_start_and_eos_at_its_end(tok):
    long_doc = " ".join(synthetic.story(random.Random(0), synthetic.World(), 8) for _ in range(3))
    rows = _rows(tok, [long_doc], seq_len=64, bins=1, shuffle_bins=False)
    segs = [s for r in rows for s in _segments(r)]
    assert len(segs) == math.ceil((len(tok.encode(long_doc)) + 2) / 64) > 5
    assert segs[0][0] == tok.bos_id and all(s[0] != tok.bos_id for s in segs[1:])
    assert segs[-1][-1] == tok.eos_id and all(s[-1] != tok.eos_id for s in segs[:-1])
    assert tok.decode([t for s in segs for t in s][1:-1]) == long_doc


def test_padding_only_where_the_next_document_does_not_fit(tok):
    # One bin, no shuffling: rows come out in order, and first-fit closes a row exactly when
    # the next piece is longer than the space left.
    rows = _rows(tok, DOCS, seq_len=256, bins=1, shuffle_bins=False)
    for r, nxt in zip(rows, rows[1:]):
        free = int((r["segment_ids"] == 0).sum())
        next_len = int((nxt["segment_ids"] == 1).sum())
        assert next_len > free
    pad = sum(int((r["segment_ids"] == 0).sum()) for r in rows) / (len(rows) * 256)
    assert pad < 0.25


def test_more_bins_means_less_padding(tok):
    def pad_fraction(bins, mode):
        rows = _rows(tok, DOCS, seq_len=256, bins=bins, mode=mode)
        return sum(int((r["segment_ids"] == 0).sum()) for r in rows) / (len(rows) * 256)
    assert pad_fraction(16, "first_fit") < pad_fraction(1, "first_fit")
    assert pad_fraction(16, "best_fit") < 0.1


class _WithBadRecords:
    """Documents 3 and 7 fail validation, like bad JSONL lines would."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i in (3, 7):
            raise DataError(f"f.jsonl:{i + 1}: malformed JSON")
        return Doc(f"document number {i} is fine.", f"f.jsonl:{i + 1}")


def test_skipped_records_are_counted_and_leave_rows_well_formed(tok):
    rows = _rows(tok, _WithBadRecords(), seq_len=64, bins=2, skip=True)
    for r in rows:
        assert_row_invariants(r, tok.pad_id)
    stats = np.sum([r[packing.STATS_KEY] for r in rows], axis=0)
    assert stats.tolist() == [8, 0, 2, 0, 0, 0]
    assert sum(len(_segments(r)) for r in rows) == 8


def test_bad_records_raise_with_location_unless_skipping(tok):
    with pytest.raises(DataError, match=r"f.jsonl:4: malformed JSON"):
        _rows(tok, _WithBadRecords(), seq_len=64, skip=False)
