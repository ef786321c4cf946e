"""Exact and MinHash dedup: planted duplicates are found, distinct documents are kept."""
import dataclasses
import re

import numpy as np
import pytest

from jaxllm.curate import dedup, synthetic
from jaxllm.curate import text as T
from jaxllm.curate.config import DedupConfig

CFG = DedupConfig()


def shingle_set(text, n=5):
    ws = T.normalize(text).split()
    return {" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def jaccard(a, b):
    a, b = shingle_set(a), shingle_set(b)
    return len(a & b) / len(a | b)


def run_dedup(texts, cfg=CFG):
    keys = dedup.dedup_keys(texts, list(range(len(texts))), cfg)
    ex, near, clusters = dedup.find_duplicates(keys, cfg)
    return set(ex.tolist()), set(near.tolist()), clusters


def test_exact_dedup_ignores_case_punctuation_and_layout_and_keeps_the_first():
    texts = ["Hello, World! This is one document.", "hello world   this is ONE document",
             "A different document entirely.", "Hello world.\n\nThis is one document!"]
    ex, near, _ = run_dedup(texts, dataclasses.replace(CFG, minhash=False))
    assert ex == {1, 3} and near == set()


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    base = synthetic.prose(rng, 400)
    errs = []
    for frac in (0.02, 0.05, 0.1, 0.2, 0.4):
        for _ in range(4):
            other = synthetic.near_duplicate(rng, base, frac)
            sig, has = dedup.minhash_signatures([T.normalize(base), T.normalize(other)], CFG)
            errs.append((sig[0] == sig[1]).mean() - jaccard(base, other))
    errs = np.array(errs)
    # 112 permutations: standard error <= 0.05 per estimate; the mean error is bias.
    assert abs(errs.mean()) < 0.03 and np.abs(errs).max() < 0.15, errs


def test_signatures_do_not_depend_on_batching_or_chunking():
    rng = np.random.default_rng(1)
    texts = [T.normalize(synthetic.prose(rng, 120)) for _ in range(12)] + ["too short"]
    whole, has = dedup.minhash_signatures(texts, CFG)
    small_chunks, _ = dedup.minhash_signatures(texts, dataclasses.replace(CFG, batch_shingles=7))
    one_by_one = np.concatenate([dedup.minhash_signatures([t], CFG)[0] for t in texts])
    np.testing.assert_array_equal(whole, small_chunks)
    np.testing.assert_array_equal(whole, one_by_one)
    assert has.tolist() == [True] * 12 + [False]     # < 5 words: no shingles, no near-dedup


def precision_recall(docs, truth, removed_ids):
    """A planted copy is a true duplicate; removing it is a hit. Removing an original whose
    copy was kept is also right (one per cluster survives), so precision counts removals
    inside planted clusters, and recall counts clusters reduced to one document."""
    cluster = {d["id"]: truth.get(d["id"], d["id"]) for d in docs}
    sizes = {}
    for c in cluster.values():
        sizes[c] = sizes.get(c, 0) + 1
    in_dup_cluster = {i for i, c in cluster.items() if sizes[c] > 1}
    tp = len(removed_ids & in_dup_cluster)
    precision = tp / max(len(removed_ids), 1)
    recall = tp / max(len(truth), 1)
    return precision, recall


def test_planted_near_duplicates_found_and_distinct_documents_kept():
    docs, truth = synthetic.planted_corpus(600, dup_frac=0.15, exact_frac=0.03, junk_frac=0.0,
                                           n_words=250, edit_frac=0.1, seed=3)
    overlaps = [jaccard(next(d["text"] for d in docs if d["id"] == src),
                        next(d["text"] for d in docs if d["id"] == cp))
                for cp, src in list(truth.items())[:20] if cp.startswith("near")]
    ex, near, clusters = run_dedup([d["text"] for d in docs])
    removed = {docs[i]["id"] for i in ex | near}
    precision, recall = precision_recall(docs, truth, removed)
    print(f"\nplanted {len(truth)} copies (5-gram Jaccard of near copies ~{np.mean(overlaps):.2f}): "
          f"removed {len(removed)} (exact {len(ex)}, near {len(near)}), "
          f"precision {precision:.3f} recall {recall:.3f}")
    assert len(ex) == 18          # every planted exact copy (or its original) goes
    assert precision >= 0.99
    assert recall >= 0.85
    distinct_removed = [i for i in removed if i.startswith("orig") and
                        not any(src == i for src in truth.values())]
    assert distinct_removed == []


def test_dissimilar_pairs_are_not_merged_and_similar_ones_are():
    rng = np.random.default_rng(5)
    texts, labels = [], []
    for _ in range(40):
        base = synthetic.prose(rng, 300)
        texts += [base, synthetic.near_duplicate(rng, base, 0.5)]     # Jaccard ~0.3
        labels.append(False)
    for _ in range(40):
        base = synthetic.prose(rng, 300)
        texts += [base, synthetic.near_duplicate(rng, base, 0.03)]    # Jaccard ~0.9
        labels.append(True)
    _, near, _ = run_dedup(texts)
    merged = [2 * i + 1 in near for i in range(len(labels))]
    assert sum(m for m, lab in zip(merged, labels) if not lab) == 0
    assert sum(m for m, lab in zip(merged, labels) if lab) >= 39


def test_union_find_joins_chains_and_keeps_the_earliest():
    removed, clusters = dedup.cluster_edges([(5, 9), (9, 2), (7, 8)])
    assert removed == [5, 8, 9] and clusters == 2
    rng = np.random.default_rng(2)
    a = synthetic.prose(rng, 300)
    b = synthetic.near_duplicate(rng, a, 0.05)
    c = synthetic.near_duplicate(rng, b, 0.05)
    _, near, clusters = run_dedup([c, synthetic.prose(rng, 300), a, b])
    assert near == {2, 3} and clusters == 1


def test_minhash_agrees_with_datasketch_when_installed():
    datasketch = pytest.importorskip("datasketch", reason="datasketch is an optional benchmark dependency")
    rng = np.random.default_rng(4)
    base = synthetic.prose(rng, 300)
    for frac in (0.05, 0.2):
        other = synthetic.near_duplicate(rng, base, frac)
        ms = []
        for t in (base, other):
            m = datasketch.MinHash(num_perm=112, seed=1)
            m.update_batch([s.encode() for s in shingle_set(t)])
            ms.append(m)
        ours, _ = dedup.minhash_signatures([T.normalize(base), T.normalize(other)], CFG)
        assert abs(ms[0].jaccard(ms[1]) - (ours[0] == ours[1]).mean()) < 0.15
    assert re.match(r"\d", datasketch.__version__)
