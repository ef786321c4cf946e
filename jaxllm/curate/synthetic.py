"""Seeded synthetic corpora for tests and benchmarks: nothing is downloaded.

* prose: sentences of words sampled by their frequency in `pydoc_data.topics` (the English
  documentation that ships with every Python). Independent documents share almost no word
  5-grams, yet read as English to the language model and pass the quality heuristics.
* near duplicates: a copy with one contiguous span of `edit_frac` of its words replaced
  (edit_frac=0.1: about 90% word overlap, 5-gram Jaccard about 0.8 for 300 words).
* crawl junk: navigation menus, keyword spam and word salad, as a "raw crawl" class.
* reference text: paragraphs of pydoc_data.topics, as a "high quality" class.
"""
from __future__ import annotations

import functools
import re
from collections import Counter

import numpy as np


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[list[str], np.ndarray]:
    """Lower-case alphabetic words of pydoc_data.topics and their relative frequencies."""
    from pydoc_data.topics import topics
    counts = Counter(w for t in topics.values() for w in re.findall(r"[a-z]{2,}", t.lower()))
    counts.update({"a": 2000})                       # the regex above skips one-letter words
    words = sorted(counts)
    freq = np.array([counts[w] for w in words], np.float64)
    return words, freq / freq.sum()


def reference_paragraphs(min_words: int = 60) -> list[str]:
    """Paragraphs of real English prose (Python's documentation), in a fixed order."""
    from pydoc_data.topics import topics
    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            para = " ".join(para.split())
            if len(para.split()) >= min_words and "::=" not in para and ">>>" not in para:
                out.append(para)
    return out


def _sample(rng: np.random.Generator, n: int) -> list[str]:
    words, p = vocabulary()
    return [words[i] for i in np.searchsorted(_cdf(), rng.random(n), side="right")]


@functools.lru_cache(maxsize=1)
def _cdf() -> np.ndarray:
    c = np.cumsum(vocabulary()[1])
    return c / c[-1]


def prose(rng: np.random.Generator, n_words: int = 300) -> str:
    """Paragraph lines of sentences, about n_words words in all."""
    paras, count = [], 0
    while count < n_words:
        lens = rng.integers(8, 20, size=int(rng.integers(3, 6)))
        ws = _sample(rng, int(lens.sum()))
        cuts = np.concatenate(([0], np.cumsum(lens)))
        paras.append(" ".join(" ".join(ws[a:b]).capitalize() + "." for a, b in zip(cuts[:-1], cuts[1:])))
        count += int(lens.sum())
    return "\n\n".join(paras)


def near_duplicate(rng: np.random.Generator, text: str, edit_frac: float = 0.1) -> str:
    """Replace one contiguous run of edit_frac of the words with fresh ones; layout kept."""
    tokens = re.split(r"(\s+)", text)                 # words at even indexes, spaces at odd
    idx = list(range(0, len(tokens), 2))
    k = max(1, int(round(edit_frac * len(idx))))
    start = int(rng.integers(0, len(idx) - k + 1))
    for j, w in zip(idx[start:start + k], _sample(rng, k)):
        tokens[j] = w
    return "".join(tokens)


def crawl_junk(rng: np.random.Generator) -> str:
    """Low-quality web text of several kinds."""
    words, p = vocabulary()
    kind = int(rng.integers(0, 3))
    if kind == 0:     # navigation and boilerplate
        items = ["Home", "About us", "Contact", "Login", "Register", "Cart", "FAQ", "Blog",
                 "Shop now", "Sign up for our newsletter", "Privacy", "Sitemap", "Careers"]
        lines = [" | ".join(rng.choice(items, size=int(rng.integers(3, 7)))) for _ in range(12)]
        return "\n".join(lines) + "\nCopyright 2024 All rights reserved"
    if kind == 1:     # keyword spam
        kw = _sample(rng, 4)
        spam = ["best", "cheap", "buy", "online", "free", "discount", "top", "deals", "sale"]
        out = [f"{rng.choice(spam)} {rng.choice(kw)} {rng.choice(spam)} {rng.choice(kw)}"
               for _ in range(int(rng.integers(40, 80)))]
        return " ".join(out) + " click here buy now"
    ws = [words[i] for i in rng.choice(len(words), size=int(rng.integers(150, 300)))]
    return " ".join(ws)   # word salad: uniform over the vocabulary, no sentences


def planted_corpus(n_docs: int, dup_frac: float = 0.1, exact_frac: float = 0.02,
                   junk_frac: float = 0.05, n_words: int = 200, edit_frac: float = 0.1,
                   seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    """n_docs records {"id", "text", "url"}, shuffled, and the ground truth: for every planted
    copy (near or exact), the id of the original it was made from."""
    rng = np.random.default_rng(seed)
    n_dup, n_exact = int(n_docs * dup_frac), int(n_docs * exact_frac)
    n_junk = int(n_docs * junk_frac)
    n_orig = n_docs - n_dup - n_exact - n_junk
    docs = [{"id": f"orig-{i}", "text": prose(rng, n_words)} for i in range(n_orig)]
    truth: dict[str, str] = {}
    for j, src in enumerate(rng.integers(0, n_orig, size=n_dup)):
        docs.append({"id": f"near-{j}", "text": near_duplicate(rng, docs[src]["text"], edit_frac)})
        truth[f"near-{j}"] = docs[src]["id"]
    for j, src in enumerate(rng.integers(0, n_orig, size=n_exact)):
        docs.append({"id": f"exact-{j}", "text": docs[src]["text"]})
        truth[f"exact-{j}"] = docs[src]["id"]
    docs += [{"id": f"junk-{j}", "text": crawl_junk(rng)} for j in range(n_junk)]
    for d in docs:
        d["url"] = f"https://site{int(rng.integers(0, 1000))}.example.org/{d['id']}"
    order = rng.permutation(len(docs))
    return [docs[i] for i in order], truth
