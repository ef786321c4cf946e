"""Rule-based quality filters: Gopher quality, Gopher repetition, C4 lines, FineWeb lines.

Each follows the datatrove class of the same name (huggingface/datatrove,
src/datatrove/pipeline/filters/{gopher_quality_filter,gopher_repetition_filter,c4_filters,
fineweb_quality_filter}.py), with the thresholds in config.py. A filter returns the reason
string for a rejected document, or None. Words come from the regex tokenizer in text.py
(callers that already tokenized pass `words`).
Deliberate differences from datatrove, each closer to the Gopher paper (or optional):
  * stop words are counted as datatrove does (occurrences, case-sensitive) unless
    distinct_stop_words=True (distinct words, case-insensitively: Gopher's "at least two of");
  * the alphabetic-word fraction is over word tokens only (datatrove's numerator includes
    punctuation tokens, its denominator does not);
  * Gopher's duplicate-line fractions skip blank lines.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

from jaxllm.curate import text as T
from jaxllm.curate.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig

_HAS_ALPHA_RE = re.compile(r"[^\W\d_]")


# --- Gopher quality ---------------------------------------------------------------------------

def gopher_quality(text: str, cfg: GopherQualityConfig, words: list[str] | None = None
                   ) -> str | None:
    ws = T.words(text) if words is None else words
    n = len(ws)
    if n < cfg.min_doc_words:
        return "short_doc"
    if n > cfg.max_doc_words:
        return "long_doc"
    mean_len = sum(map(len, ws)) / n
    if mean_len < cfg.min_avg_word_length:
        return "below_avg_word_length"
    if mean_len > cfg.max_avg_word_length:
        return "above_avg_word_length"
    if text.count("#") / n > cfg.max_symbol_word_ratio:
        return "too_many_hashes"
    if (text.count("...") + text.count("…")) / n > cfg.max_symbol_word_ratio:
        return "too_many_ellipsis"
    lines = text.splitlines() or [text]
    bullets = tuple(cfg.bullets)
    if bullets and sum(ln.lstrip().startswith(bullets) for ln in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        return "too_many_bullets"
    ends = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
    if ends / len(lines) > cfg.max_ellipsis_lines_ratio:
        return "too_many_end_ellipsis"
    if sum(1 for w in ws if _HAS_ALPHA_RE.search(w)) / n < cfg.min_alpha_words_ratio:
        return "below_alpha_threshold"
    stop = set(cfg.stop_words)
    if cfg.distinct_stop_words:
        n_stop = len(stop.intersection(w.lower() for w in ws))
    else:
        n_stop = sum(w in stop for w in ws)
    if n_stop < cfg.min_stop_words:
        return "few_stop_words"
    return None


# --- Gopher repetition ------------------------------------------------------------------------

def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, characters in them): datatrove's find_duplicates."""
    seen: set[str] = set()
    n_dup = chars = 0
    for x in items:
        if x in seen:
            n_dup += 1
            chars += len(x)
        else:
            seen.add(x)
    return n_dup, chars


def _word_ids(ws: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Words numbered per document (equal words, equal ids) and cumulative word lengths."""
    ids: dict[str, int] = {}
    w = np.array([ids.setdefault(x, len(ids)) for x in ws], dtype=np.uint64)
    cum = np.concatenate(([0], np.cumsum(np.fromiter(map(len, ws), np.int64, len(ws)))))
    return w, cum


def _ngram_codes(w: np.ndarray, cum: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the word n-grams (a 64-bit polynomial of word ids: equal n-grams get
    equal codes, and collisions are negligible at document scale) and each n-gram's length
    in characters without joining spaces ("".join); add n - 1 for " ".join."""
    m = w.size - n + 1
    code = np.zeros(m, np.uint64)
    for k in range(n):
        code = code * np.uint64(0x9E3779B97F4A7C15) + w[k:k + m] + np.uint64(1)
    return code, cum[n:] - cum[:-n]


def _top_ngram_chars(code: np.ndarray, length: np.ndarray, n: int) -> int:
    """Characters covered by all occurrences of the most frequent n-gram (the earliest one
    on ties, like Counter.most_common), each measured as " ".join (datatrove's get_n_grams)."""
    _, first, inverse, counts = np.unique(code, return_index=True, return_inverse=True,
                                          return_counts=True)
    best = np.flatnonzero(counts == counts.max())
    top = best[np.argmin(first[best])]
    return int((length[first[top]] + n - 1) * counts[top])


def _duplicated_ngram_chars(code: np.ndarray, length: np.ndarray, n: int) -> int:
    """Characters in repeated n-grams, skipping ahead n words after each repeat so that
    overlapping repeats are not double counted (datatrove's find_all_duplicate, which
    measures each n-gram as "".join: no joining spaces)."""
    seen: set[int] = set()
    codes = code.tolist()
    chars = i = 0
    while i < len(codes):
        if codes[i] in seen:
            chars += int(length[i])
            i += n
        else:
            seen.add(codes[i])
            i += 1
    return chars


def gopher_repetition(text: str, cfg: GopherRepetitionConfig, words: list[str] | None = None
                      ) -> str | None:
    n_chars = max(len(text), 1)
    paras = T.paragraphs(text)
    dup, chars = _duplicates(paras)
    if dup / len(paras) > cfg.dup_para_frac:
        return "dup_para_frac"
    if chars / n_chars > cfg.dup_para_char_frac:
        return "dup_para_char_frac"
    # Blank lines are layout, not repeated content (datatrove counts them, so a text with
    # paragraphs separated by blank lines would fail on them alone).
    lines = [ln for ln in text.splitlines() if ln.strip()] or [text]
    dup, chars = _duplicates(lines)
    if dup / len(lines) > cfg.dup_line_frac:
        return "dup_line_frac"
    if chars / n_chars > cfg.dup_line_char_frac:
        return "dup_line_char_frac"
    ws = T.words(text) if words is None else words
    w, cum = _word_ids(ws)
    for n, frac in cfg.top_n_grams:
        if len(ws) >= n and _top_ngram_chars(*_ngram_codes(w, cum, n), n) / n_chars > frac:
            return f"top_{n}_gram"
    for n, frac in sorted(cfg.dup_n_grams):
        if len(ws) < n:
            continue
        code, length = _ngram_codes(w, cum, n)
        if np.unique(code).size == code.size:
            # No repeated n-gram means no repeated longer n-gram either: the rest pass.
            break
        if _duplicated_ngram_chars(code, length, n) / n_chars > frac:
            return f"duplicated_{n}_n_grams"
    return None


# --- C4 line filter ---------------------------------------------------------------------------

_CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCT = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")


def c4_lines(text: str, cfg: C4Config, line_counts: Counter | None = None
             ) -> tuple[str | None, str | None]:
    """C4's rules: drop bad lines, then drop the whole document for a few hard signals or for
    too few sentences. Returns (kept text, None) or (None, reason). Removed lines are counted
    by reason in `line_counts`."""
    counts = line_counts if line_counts is not None else Counter()
    kept: list[str] = []
    n_sentences = 0
    for line in text.splitlines():
        line = line.strip()
        ws = line.split()
        if cfg.max_word_length != -1 and any(len(w) > cfg.max_word_length for w in ws):
            counts["line_too_long_word"] += 1
            continue
        if cfg.remove_citations:
            line = _CITATION_RE.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(_END_PUNCT) or line.endswith("...")):
            counts["line_no_terminal_punct"] += 1
            continue
        if len(ws) < cfg.min_words_per_line:
            counts["line_too_few_words"] += 1
            continue
        low = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in low:
            return None, "lorem_ipsum"
        if cfg.filter_javascript and "javascript" in low:
            counts["line_javascript"] += 1
            continue
        if cfg.filter_curly_bracket and "{" in line:
            return None, "curly_bracket"
        if cfg.filter_policy and any(p in low for p in _POLICY):
            counts["line_policy"] += 1
            continue
        n_sentences += len(T.sentences(line))
        kept.append(line)
    if n_sentences < cfg.min_num_sentences:
        return None, "too_few_sentences"
    return "\n".join(kept).strip(), None


# --- FineWeb line filter ----------------------------------------------------------------------

_STOP_CHARS = (".", "'", '"', "!", "?")


def fineweb_quality(text: str, cfg: FineWebConfig) -> str | None:
    lines = text.split("\n")
    ratio = sum(1 for ln in lines if ln.endswith(_STOP_CHARS)) / len(lines)
    if ratio <= cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
        return "line_punct_ratio"
    ratio = sum(1 for ln in lines if len(ln) <= cfg.short_line_length) / len(lines)
    if ratio >= cfg.short_line_thr:
        return "short_line_ratio"
    non_empty = [ln for ln in lines if ln.strip()]
    chars = max(len(text) - text.count("\n"), 1)
    if _duplicates(non_empty)[1] / chars >= cfg.char_duplicates_ratio:
        return "char_dup_ratio"
    n_words = max(len(T.words(text)), 1)
    if text.count("\n") / n_words > cfg.new_line_ratio:
        return "list_ratio"
    return None
