"""Text primitives every curation stage shares: a regex word tokenizer and normalisation.

NLTK's word_tokenize (what datatrove uses) needs punkt data that cannot be downloaded here,
so words are regex matches instead: runs of letters/digits, joined by an inner apostrophe,
hyphen or dot ("don't", "e-mail", "3.14"). Punctuation is never a word. Counts therefore
differ slightly from datatrove's, which also counts punctuation tokens in some ratios.
"""
from __future__ import annotations

import re
import unicodedata

# [^\W_] is "a letter or a digit" in any script.
WORD_RE = re.compile(r"[^\W_]+(?:['’\-.][^\W_]+)*")
_PUNCT_RE = re.compile(r"[^\w\s]|_")
_SPACE_RE = re.compile(r"\s+")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def words(text: str) -> list[str]:
    """Word tokens of `text` (no punctuation tokens)."""
    return WORD_RE.findall(text)


def sentences(line: str) -> list[str]:
    """Split one line into sentences at '.', '!' or '?' followed by whitespace."""
    return [s for s in _SENTENCE_END_RE.split(line.strip()) if s.strip()]


def normalize(text: str) -> str:
    """Lower-case, strip punctuation and diacritics, collapse whitespace to single spaces.

    This mirrors datatrove's `simplify_text`, used before exact and MinHash dedup so that
    copies differing only in case, punctuation, accents or layout hash the same.
    """
    text = _PUNCT_RE.sub("", text.lower())
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text)
                       if unicodedata.category(c) != "Mn")
    return _SPACE_RE.sub(" ", text).strip()


def paragraphs(text: str) -> list[str]:
    """Paragraphs are separated by two or more newlines (datatrove's `\\n{2,}`)."""
    return re.split(r"\n{2,}", text.strip())
