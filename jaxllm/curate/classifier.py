"""Quality classifier: hashed word n-gram features + logistic regression, in numpy.

DCLM trains fastText on a high-quality reference set against raw crawl; this is the same
model family (a linear classifier over hashed word 1..n-grams) without a compiled
dependency: features are the n-gram hashes dedup.py already computes, folded into
`n_features` buckets, log(1 + count) weighted and L2 normalised per document; training is
mini-batch SGD on the logistic loss with L2 decay, seeded, so the same data gives the same
model file. `score` returns P(high quality).
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxllm.curate import dedup
from jaxllm.curate import text as T
from jaxllm.curate.config import ClassifierConfig
from jaxllm.errors import UserError

FORMAT_VERSION = 1


class ModelFileError(UserError):
    """classifier.model_path is missing or is not a model this version reads."""


@dataclasses.dataclass
class Features:
    """A batch as a sparse matrix in coordinate form (one entry per distinct doc/feature)."""
    doc: np.ndarray     # (nnz,) int64
    idx: np.ndarray     # (nnz,) int64 in [0, n_features)
    val: np.ndarray     # (nnz,) float32
    n_docs: int


def featurize(texts: list[str], n_features: int, ngrams: int) -> Features:
    wh, wd = dedup.word_hashes([T.normalize(t) for t in texts])
    docs, idxs = [], []
    for n in range(1, ngrams + 1):
        h, d = dedup.ngram_hashes(wh, wd, n)
        docs.append(d)
        idxs.append((h % np.uint64(n_features)).astype(np.int64))
    doc, idx = np.concatenate(docs), np.concatenate(idxs)
    pair, counts = np.unique(doc * n_features + idx, return_counts=True)
    doc, idx = pair // n_features, pair % n_features
    val = np.log1p(counts).astype(np.float32)
    norm = np.sqrt(np.bincount(doc, weights=val * val, minlength=len(texts)))
    val = val / np.maximum(norm[doc], 1e-12).astype(np.float32)
    return Features(doc, idx, val, len(texts))


def _logits(w: np.ndarray, b: float, f: Features) -> np.ndarray:
    return np.bincount(f.doc, weights=w[f.idx] * f.val, minlength=f.n_docs) + b


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


@dataclasses.dataclass
class QualityModel:
    w: np.ndarray
    b: float
    n_features: int
    ngrams: int

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return _sigmoid(_logits(self.w, self.b, featurize(texts, self.n_features, self.ngrams)))

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:   # a file object keeps numpy from appending ".npz"
            np.savez(f, w=self.w, b=np.float64(self.b), n_features=self.n_features,
                     ngrams=self.ngrams, version=FORMAT_VERSION)

    @staticmethod
    def load(path: str | pathlib.Path) -> "QualityModel":
        retrain = "train one with `jaxllm curate train-classifier` and set classifier.model_path"
        if not pathlib.Path(path).is_file():
            raise ModelFileError(f"quality classifier model not found: {path} ({retrain})")
        try:
            z = np.load(path)
            version = int(z["version"])
            fields = z["w"], float(z["b"]), int(z["n_features"]), int(z["ngrams"])
        except (OSError, ValueError, KeyError, EOFError) as e:   # not an .npz, or not ours
            raise ModelFileError(f"{path} is not a quality classifier model "
                                 f"({type(e).__name__}: {e}); {retrain}") from None
        if version != FORMAT_VERSION:
            raise ModelFileError(f"{path}: model format {version}, this jaxllm reads "
                                 f"{FORMAT_VERSION}; {retrain}")
        return QualityModel(*fields)


def train(positives: list[str], negatives: list[str], cfg: ClassifierConfig) -> QualityModel:
    """Fit P(positive | text) on positives (label 1: reference) vs negatives (label 0: crawl)."""
    if not positives or not negatives:
        raise UserError(f"train-classifier needs documents of both classes, got "
                        f"{len(positives)} high-quality (--hq) and {len(negatives)} crawl "
                        f"(--crawl); point both at files with records")
    texts = list(positives) + list(negatives)
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    f = featurize(texts, cfg.n_features, cfg.ngrams)
    # Per-document slices of the coordinate arrays, so a mini-batch is a few slices.
    bounds = np.searchsorted(f.doc, np.arange(len(texts) + 1))
    w = np.zeros(cfg.n_features, np.float64)
    b = 0.0
    # Balance the classes so the decision threshold 0.5 is meaningful for unequal sets.
    cls_w = np.where(y == 1, len(y) / (2 * len(positives)), len(y) / (2 * len(negatives)))
    rng = np.random.default_rng(cfg.seed)
    for epoch in range(cfg.epochs):
        lr = cfg.learning_rate / (1.0 + epoch)   # decaying steps settle the last epochs
        perm = rng.permutation(len(texts))
        for s in range(0, len(texts), cfg.batch_size):
            docs = perm[s:s + cfg.batch_size]
            sl = np.concatenate([np.arange(bounds[d], bounds[d + 1]) for d in docs])
            local = np.repeat(np.arange(docs.size), bounds[docs + 1] - bounds[docs])
            batch = Features(local, f.idx[sl], f.val[sl], docs.size)
            p = _sigmoid(_logits(w, b, batch))
            g = (p - y[docs]) * cls_w[docs] / docs.size              # dLoss/dlogit
            w *= 1.0 - lr * cfg.l2
            np.subtract.at(w, batch.idx, lr * g[batch.doc] * batch.val)
            b -= lr * float(g.sum())
    return QualityModel(w.astype(np.float32), b, cfg.n_features, cfg.ngrams)
