"""Exact and MinHash near-duplicate detection, vectorised with numpy.

Per document (parallel, streaming; `dedup_keys`):
  * exact key: 64-bit BLAKE2b of the normalised text (text.normalize);
  * MinHash: word n-grams of the normalised text (FineWeb: 5), each hashed to 64 bits, then
    num_bands * rows_per_band (FineWeb: 14 * 8 = 112) affine permutations h(x) = a*x + b
    mod 2**64 (a odd, so each is a bijection) and the minimum per permutation; the band key
    hashes each band's rows to one 64-bit word.
Global (one pass over the keys only; `find_duplicates`):
  * exact: among documents with equal exact keys the first in input order survives;
  * near: survivors sharing any band key are joined in a union-find; each cluster keeps its
    first document in input order. Like FineWeb, candidates are not re-checked against the
    true Jaccard similarity: the LSH S-curve is the decision. With 14 bands of 8 rows a pair
    of Jaccard similarity s is caught with probability 1 - (1 - s**8)**14 (0.92 at s = 0.8,
    0.50 at s = 0.72, 0.02 at s = 0.5).

Word and n-gram hashes are computed for a whole batch of documents at once from their UTF-8
bytes (a position-weighted byte sum per word, then a splitmix64 finaliser), so no Python code
runs per word or per n-gram. Documents with fewer than n words have no shingles and take no
part in near-dedup (datatrove skips them too); exact dedup still sees them.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from jaxllm.curate import text as T
from jaxllm.curate.config import DedupConfig

_U64 = np.uint64
_MAX = np.iinfo(np.uint64).max


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over all 64 output bits (wraps mod 2**64)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _odd_constants(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, size=n, dtype=np.uint64) * _U64(2) + _U64(1)


_BYTE_POW_BASE = _U64(0x100000001B3)   # FNV-64 prime as the polynomial base


def word_hashes(norm_texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the space-separated words of normalised texts, for a whole batch.

    Returns (hash of each word (W,) uint64, document index of each word (W,) int64).
    """
    data = "\n".join(norm_texts).encode("utf-8")   # normalised text holds no newline
    buf = np.frombuffer(data, dtype=np.uint8)
    sep = (buf == 10) | (buf == 32)
    if buf.size == 0 or sep.all():
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    starts = ~sep & np.concatenate(([True], sep[:-1]))
    start_pos = np.flatnonzero(starts)
    byte_pos = np.flatnonzero(~sep)
    word_of_byte = np.cumsum(starts)[byte_pos] - 1
    offset_in_word = byte_pos - start_pos[word_of_byte]
    powers = np.cumprod(np.full(int(offset_in_word.max()) + 1, _BYTE_POW_BASE, np.uint64))
    contrib = (buf[byte_pos].astype(np.uint64) + _U64(1)) * powers[offset_in_word]
    first_byte_of_word = np.flatnonzero(np.concatenate(([True], word_of_byte[1:] != word_of_byte[:-1])))
    word_hash = _mix64(np.add.reduceat(contrib, first_byte_of_word))
    doc_of_word = np.cumsum(buf == 10)[start_pos].astype(np.int64)   # newlines before = doc index
    return word_hash, doc_of_word


def ngram_hashes(word_hash: np.ndarray, doc_of_word: np.ndarray, n: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Order-sensitive 64-bit hashes of the word n-grams that lie inside one document."""
    m = word_hash.size - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    valid = doc_of_word[:m] == doc_of_word[n - 1:]
    weights = _odd_constants(n, seed=0x5EED + n)
    acc = np.zeros(m, np.uint64)
    for k in range(n):
        acc += word_hash[k:k + m] * weights[k]
    return _mix64(acc)[valid], doc_of_word[:m][valid]


def shingles(norm_texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word n-grams of normalised texts and the document index of each."""
    return ngram_hashes(*word_hashes(norm_texts), n)


def minhash_signatures(norm_texts: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (D, num_bands * rows_per_band) uint64 and a (D,) mask of documents
    that had at least one shingle."""
    n_perm = cfg.num_bands * cfg.rows_per_band
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(0, 2**63, size=n_perm, dtype=np.uint64) * _U64(2) + _U64(1)
    b = rng.integers(0, 2**63, size=n_perm, dtype=np.uint64)
    sig = np.full((n_perm, len(norm_texts)), _MAX, dtype=np.uint64)
    sh, doc = shingles(norm_texts, cfg.n_grams)
    # Permutations run along rows and shingles along columns, so the per-document minimum
    # is a reduction over contiguous memory (4-5x faster than the transposed layout), and a
    # cache-sized chunk of columns bounds the temporary. A document may span chunks, so each
    # chunk's minima are folded into the running signature.
    buf = np.empty((n_perm, min(cfg.batch_shingles, max(sh.size, 1))), dtype=np.uint64)
    for c0 in range(0, sh.size, cfg.batch_shingles):
        s, d = sh[c0:c0 + cfg.batch_shingles], doc[c0:c0 + cfg.batch_shingles]
        h = buf[:, :s.size]
        np.multiply(a[:, None], s[None, :], out=h)
        np.add(h, b[:, None], out=h)
        seg = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1])))
        ids = d[seg]
        sig[:, ids] = np.minimum(sig[:, ids], np.minimum.reduceat(h, seg, axis=1))
    sig = np.ascontiguousarray(sig.T)
    has = np.zeros(len(norm_texts), bool)
    has[doc] = True
    return sig, has


def band_keys(sig: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """(D, num_bands) uint64: one hash of each band's rows."""
    rows = sig.reshape(sig.shape[0], cfg.num_bands, cfg.rows_per_band)
    w = _odd_constants(cfg.rows_per_band, seed=0xBA7D)
    return _mix64((rows * w).sum(axis=2, dtype=np.uint64))


def exact_key(norm_text: str) -> int:
    return int.from_bytes(hashlib.blake2b(norm_text.encode("utf-8"), digest_size=8).digest(), "little")


@dataclasses.dataclass
class DedupKeys:
    """What the global dedup pass needs of each document (about 130 bytes at FineWeb's settings)."""
    order: np.ndarray     # (D,) int64: global input order (shard index << 32 | record index)
    exact: np.ndarray     # (D,) uint64
    bands: np.ndarray     # (D, num_bands) uint64
    has_sig: np.ndarray   # (D,) bool

    @staticmethod
    def concat(parts: list["DedupKeys"], num_bands: int) -> "DedupKeys":
        if not parts:
            return DedupKeys(np.zeros(0, np.int64), np.zeros(0, np.uint64),
                             np.zeros((0, num_bands), np.uint64), np.zeros(0, bool))
        return DedupKeys(*(np.concatenate([getattr(p, f.name) for p in parts])
                           for f in dataclasses.fields(DedupKeys)))


def dedup_keys(texts: list[str], orders: list[int], cfg: DedupConfig) -> DedupKeys:
    norm = [T.normalize(t) for t in texts]
    exact = np.array([exact_key(t) for t in norm], dtype=np.uint64).reshape(len(norm))
    if cfg.minhash and norm:
        sig, has = minhash_signatures(norm, cfg)
        bands = band_keys(sig, cfg)
    else:
        bands, has = np.zeros((len(norm), cfg.num_bands), np.uint64), np.zeros(len(norm), bool)
    return DedupKeys(np.asarray(orders, np.int64).reshape(len(norm)), exact, bands, has)


def cluster_edges(edges) -> tuple[list[int], int]:
    """Union-find over (order, order) candidate pairs. Each connected component keeps its
    smallest order key (first document in input order); returns (the others, sorted; number
    of components). The result depends only on the set of edges, so every runner agrees."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:                      # path compression
            parent[x], x = root, parent[x]
        return root

    for i, j in edges:
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    removed = sorted(x for x in parent if find(x) != x)
    n_clusters = len({find(x) for x in removed})
    return removed, n_clusters


def first_of_group(orders) -> tuple[int, list[int]]:
    """(kept, removed) for one group of documents sharing a key: the first in input order stays."""
    srt = sorted(int(o) for o in orders)
    return srt[0], srt[1:]


def band_edges(order: np.ndarray, bands: np.ndarray) -> np.ndarray:
    """(E, 2) int64 pairs (first member, other member) of every group of documents that share
    a band key, band by band. `order` must be sorted ascending."""
    out = []
    for band in range(bands.shape[1]):
        k = bands[:, band]
        srt = np.argsort(k, kind="stable")            # ties stay in input order
        ks = k[srt]
        new_group = np.concatenate(([True], ks[1:] != ks[:-1]))
        if new_group.all():
            continue
        group_first = np.maximum.accumulate(np.where(new_group, np.arange(ks.size), 0))
        member = np.flatnonzero(~new_group)
        out.append(np.stack([order[srt[group_first[member]]], order[srt[member]]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def find_duplicates(keys: DedupKeys, cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (order keys removed as exact duplicates, order keys removed as near duplicates,
    number of near-duplicate clusters with more than one member)."""
    idx = np.argsort(keys.order, kind="stable")
    order, exact, bands, has = keys.order[idx], keys.exact[idx], keys.bands[idx], keys.has_sig[idx]
    keep = np.ones(order.size, bool)
    if cfg.exact and order.size:
        by_hash = np.lexsort((order, exact))               # by hash, then input order
        first = np.concatenate(([True], exact[by_hash][1:] != exact[by_hash][:-1]))
        keep[by_hash[~first]] = False
    removed_exact = order[~keep]
    if not cfg.minhash:
        return removed_exact, np.zeros(0, np.int64), 0
    cand = keep & has
    near, n_clusters = cluster_edges(band_edges(order[cand], bands[cand]).tolist())
    return removed_exact, np.asarray(near, np.int64), n_clusters
