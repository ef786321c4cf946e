"""Documents longer than `data.max_doc_chars`, read in pieces of at most that many characters.

A 10 MB single-line document used to be read, decoded and tokenized whole, and grain's
prefetch buffers then held several such copies at once (a 3-step run: 4 GB, 64 s). Now a
document is handed on as pieces of at most `max_chars` characters, each decoded and tokenized
alone, so what a pipeline stage holds per record is bounded whatever the record's size:

  * plain text and JSONL records are cut in their file bytes, and only one piece's bytes are
    read at a time (a JSONL line is scanned for its string literals in the memory map, the
    rest of the object is parsed with the long literals left out, and the text field is
    decoded piece by piece);
  * Parquet and ArrayRecord records arrive whole from their readers and are cut in memory.

Cuts fall just before a space where one is near (within `LOOKBACK` characters of the limit),
else at a character boundary, never inside a UTF-8 sequence or a JSON escape, so the pieces
concatenate to exactly the document: nothing is lost. Each piece is tokenized alone (the first
with bos, the last with eos, later ones without SentencePiece's dummy-prefix "▁"), so a cut
before a space, which is a word boundary to the tokenizer, gives the tokens of the whole
document. The pipeline counts the extra pieces in `stats["doc_pieces"]`.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Iterator

LOOKBACK = 256            # how far back from the limit a cut looks for a space
_BIG_LITERAL = 4096        # JSON string literals longer than this are left out of the skeleton
# Possessive quantifiers: the plain form keeps a backtracking mark per escape (150 MB of regex
# state for a 10 MB literal).
_LITERAL = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
# One JSON escape; a surrogate pair is one unit (cutting between its halves would leave two
# unpaired surrogates).
_ESCAPE = re.compile(rb'\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\.',
                     re.DOTALL)
_PLACEHOLDER = "\u0000jaxllm-long-literal-{}"


def text_pieces(text: str, max_chars: int, start: int = 0) -> Iterator[str]:
    """An in-memory document cut into pieces of at most `max_chars`, from piece `start` on."""
    pos, k = 0, 0
    while pos < len(text):
        end = len(text) if len(text) - pos <= max_chars else pos + max_chars
        if end < len(text):
            space = text.rfind(" ", max(pos, end - min(LOOKBACK, max_chars // 4)), end)
            if space > pos:
                end = space
        if k >= start:
            yield text[pos:end]
        pos, k = end, k + 1


def _byte_cut(window: bytes, limit: int, json_escapes: bool) -> int:
    """Length of the next piece: the bytes of `window` (which starts at a piece boundary and
    runs a little past `limit`) up to a boundary at or before `limit`."""
    if len(window) <= limit:
        return len(window)
    q = limit
    if json_escapes:
        for m in _ESCAPE.finditer(window):
            if m.start() >= q:
                break
            if q < m.end():
                q = m.start()
                break
    while q > 0 and window[q] & 0xC0 == 0x80:   # not inside a UTF-8 sequence
        q -= 1
    space = window.rfind(b" ", max(0, q - min(LOOKBACK, limit // 4)), q)
    if space > 0:
        q = space
    return q


def byte_pieces(read: Callable[[int, int], bytes], a: int, b: int, max_chars: int, start: int,
                decode: Callable[[bytes, int], str], json_escapes: bool = False) -> Iterator[str]:
    """Bytes [a, b) of a file (through `read(start, end)`), cut into pieces of at most
    `max_chars` bytes (so at most that many characters) and decoded one at a time."""
    pos, k = a, 0
    while pos < b:
        window = read(pos, min(b, pos + max_chars + 12))  # 12: the longest escape
        n = len(window) if b - pos <= max_chars else _byte_cut(window, max_chars, json_escapes)
        assert n > 0, (pos, max_chars)  # max_chars >= 64 leaves room past any escape
        if k >= start:
            yield decode(window[:n], pos)
        pos, k = pos + n, k + 1


def json_field_pieces(scan, read, a: int, b: int, text_of: Callable[[bytes], str], where: str,
                      max_chars: int, start: int, error) -> Iterator[str]:
    """The text field of the JSON object in bytes [a, b), in pieces, without holding the line:
    `scan(fn)` runs fn on the file's memory map, `read(s, e)` copies bytes [s, e), `text_of`
    parses a JSON object and returns its text field (or raises for a bad record), `error(msg)`
    makes the exception for a bad string."""
    def big_literals(buf):
        return [(m.start(), m.end()) for m in _LITERAL.finditer(buf, a, b) if m.end() - m.start() > _BIG_LITERAL]

    spans = scan(big_literals)
    skeleton, pos = [], a
    for k, (s, e) in enumerate(spans):
        skeleton += [read(pos, s), json.dumps(_PLACEHOLDER.format(k)).encode()]
        pos = e
    skeleton.append(read(pos, b))
    try:
        value = text_of(b"".join(skeleton))  # the object without its long literals
    except Exception as e:
        if not spans or "malformed JSON" not in str(e):
            raise
        raise error(f"{e} (columns count the line with its {len(spans)} long "
                    f"string{'s' if len(spans) > 1 else ''} left out)") from None
    for k, (s, e) in enumerate(spans):
        if value == _PLACEHOLDER.format(k):
            def decode(raw: bytes, at: int) -> str:
                try:
                    return json.loads(b'"' + raw + b'"')
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise error(f"{where}: bad JSON string near byte {at - a} of the line "
                                f"({getattr(err, 'msg', err)})") from None
            yield from byte_pieces(read, s + 1, e - 1, max_chars, start, decode, json_escapes=True)
            return
    yield from text_pieces(value, max_chars, start)
