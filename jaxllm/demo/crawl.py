"""A raw, crawl-like corpus made on the spot for the demo's curation stage (no download).

curate/synthetic.py's `planted_corpus` gives English prose with planted near and exact
duplicates and crawl junk (menus, keyword spam, word salad). On top of it, a seeded share of
the originals that have no planted copy is turned into
  * other languages:  French, German or Spanish prose (language ID removes it),
  * blocked URLs:     the page sits on a blocked domain or under a banned URL word,
  * boilerplate:      cookie / JavaScript / terms-of-use lines inside good text (C4 drops
                      the lines, keeps the document),
  * PII:              an e-mail and an IP address in good text (kept, scrubbed).
Each record is {"id", "text", "url"} in JSONL shards; `truth.jsonl` holds each id's planted
category, so the report can say what curation kept of each kind.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jaxllm.curate import synthetic

CATEGORIES = ("clean", "pii", "boilerplate", "near_duplicate", "exact_duplicate", "junk",
              "other_language", "blocked_url")

# Frequent function and content words: enough for fastText language ID to be sure.
FOREIGN = {
    "fr": ("le la les un une des et est dans pour que qui sur avec pas plus nous vous mais "
           "très bien fait comme tout être avoir cette ces leur aussi après avant maison ville "
           "temps jour année monde vie enfant homme femme travail pays toujours encore"),
    "de": ("der die das und ist nicht ein eine mit sich auf für von dem den zu auch wie aber "
           "wird sind nach noch bei oder wir sie haben sehr immer heute Jahr Zeit Stadt Haus "
           "Kinder Welt Arbeit Leben gut neue große schon über unter zwischen"),
    "es": ("el la los las un una y es en por que con para no se del al como más pero muy "
           "también ciudad casa tiempo año mundo vida niño hombre mujer trabajo país siempre "
           "todos sobre entre después antes bien nuevo grande hoy"),
}
BOILERPLATE = ("This website uses cookies to improve your experience and to show you relevant ads.",
               "Please enable JavaScript in your browser to see all of the content on this page.",
               "By using this site you agree to our terms of use and our privacy policy.")
BLOCKED_HOSTS = ("hot-videos.xxx", "www.best-casino-bonus.com", "example-spam-domain.com",
                 "free.porn")


def foreign_prose(rng: np.random.Generator, lang: str, n_words: int) -> str:
    words = FOREIGN[lang].split()
    paras, count = [], 0
    while count < n_words:
        sents = []
        for _ in range(int(rng.integers(3, 6))):
            ws = [words[i] for i in rng.integers(0, len(words), size=int(rng.integers(8, 16)))]
            sents.append(" ".join(ws).capitalize() + ".")
            count += len(ws)
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


def with_boilerplate(rng: np.random.Generator, text: str) -> str:
    paras = text.split("\n\n")
    for line in rng.choice(BOILERPLATE, size=2, replace=False):
        paras.insert(int(rng.integers(0, len(paras) + 1)), str(line))
    return "\n\n".join(paras)


def with_pii(rng: np.random.Generator, text: str) -> str:
    user = f"{rng.choice(['anna', 'j.smith', 'info', 'kontakt'])}{int(rng.integers(1, 99))}"
    ip = ".".join(str(int(x)) for x in rng.integers(1, 255, size=4))
    return (f"{text}\n\nWrite to {user}@mail{int(rng.integers(0, 50))}.example.net with any "
            f"question, or reach the server at {ip} for the files.")


def crawl_corpus(n_docs: int, seed: int = 0, *, n_words: int = 200) -> tuple[list[dict], dict[str, str]]:
    """(records {"id", "text", "url"} in crawl order, {id: planted category})."""
    docs, copies = synthetic.planted_corpus(n_docs, dup_frac=0.1, exact_frac=0.03, junk_frac=0.1,
                                            n_words=n_words, seed=seed)
    rng = np.random.default_rng(seed + 1)
    truth: dict[str, str] = {}
    copied = set(copies.values())
    free = [d for d in docs if d["id"].startswith("orig-") and d["id"] not in copied]
    rng.shuffle(free)
    shares = {"other_language": 0.1, "blocked_url": 0.05, "boilerplate": 0.1, "pii": 0.08}
    start = 0
    for kind, share in shares.items():
        for d in free[start:start + int(share * n_docs)]:
            if kind == "other_language":
                lang = str(rng.choice(sorted(FOREIGN)))
                d["text"] = foreign_prose(rng, lang, n_words)
                d["url"] = d["url"].replace(".example.org/", f".example.{lang}/")
            elif kind == "blocked_url":
                d["url"] = f"https://{rng.choice(BLOCKED_HOSTS)}/{d['id']}"
            elif kind == "boilerplate":
                d["text"] = with_boilerplate(rng, d["text"])
            else:
                d["text"] = with_pii(rng, d["text"])
            truth[d["id"]] = kind
        start += int(share * n_docs)
    for d in docs:
        i = d["id"]
        truth.setdefault(i, {"near": "near_duplicate", "exact": "exact_duplicate",
                             "junk": "junk"}.get(i.split("-")[0], "clean"))
    return docs, truth


def write_crawl(out_dir: str, n_docs: int, shards: int = 4, seed: int = 0) -> dict[str, int]:
    """raw/crawl-0000N.jsonl shards and raw/truth.jsonl; returns {category: documents}."""
    docs, truth = crawl_corpus(n_docs, seed)
    os.makedirs(out_dir, exist_ok=True)
    for s in range(shards):
        with open(os.path.join(out_dir, f"crawl-{s:05d}.jsonl"), "w", encoding="utf-8") as f:
            for d in docs[s::shards]:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    # written last: its presence means the shards are complete
    tmp = os.path.join(out_dir, "truth.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "category": truth[d["id"]]}) + "\n")
    os.replace(tmp, os.path.join(out_dir, "truth.jsonl"))
    return {c: sum(1 for v in truth.values() if v == c) for c in CATEGORIES}
