"""Document sources: JSONL, Parquet, plain text and ArrayRecord files as random-access lists.

Each source is a grain random-access data source (`len` + `__getitem__`) whose items are
`Doc(text, where)`; `where` is "file:line" (or "file:row N" / "file:record N") so every
problem with user data can be reported at its origin. Random access is what lets grain shuffle
globally, shard by index and resume from an index without re-reading what came before.

Opening a source only builds an index (line offsets, row counts); documents are decoded and
validated lazily, in whichever grain worker reads them. Bad records raise `DataError`; the
pipeline turns that into skip-and-count when `skip_bad_records` is set.

Besides `src[i]`, a source gives `src.read_pieces(i, max_chars)` (a long document in bounded
pieces, see doc_pieces.py), `src.where(i)` (its location, without reading it) and, opened with
`records=True`, `src.record(i)`: the whole JSON object (chat data, chat.py).
"""
from __future__ import annotations

import bisect
import collections
import functools
import glob
import json
import mmap
import os
import threading
from typing import Iterator, NamedTuple

import numpy as np

from jaxllm.data import doc_pieces
from jaxllm.data.config import SourceConfig
from jaxllm.errors import UserError


class DataError(UserError):
    """A problem with user data; the message starts with the file and line it came from."""


class BadRecords:
    """A start-up scan's bad records: `read(fn)` is (True, fn()), or (False, None) when fn raises
    DataError (reading the record, e.g. malformed JSON, or encoding it): counted, with the first
    `show` messages kept (each names its file:line); strict: that error is raised instead."""

    def __init__(self, strict: bool, show: int = 5):
        self.strict, self.show, self.count, self.first = strict, show, 0, []

    def read(self, fn):
        try:
            return True, fn()
        except DataError as e:
            if self.strict:
                raise DataError(f"{e} (data.strict=true; false skips and counts bad records)") from None
            self.count += 1
            if len(self.first) < self.show:
                self.first.append(str(e))
            return False, None


class Doc(NamedTuple):
    text: str
    where: str


class Record(NamedTuple):
    """A whole JSON object (a chat example): JSONL line, Parquet row or ArrayRecord record."""
    obj: dict
    where: str


_EXT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                ".txt": "text", ".text": "text", ".md": "text", ".array_record": "arrayrecord",
                ".arrayrecord": "arrayrecord"}


def expand_paths(pattern: str) -> list[str]:
    """A file, a directory (its files, sorted) or a glob -> sorted list of files."""
    if os.path.isdir(pattern):
        files = [os.path.join(pattern, f) for f in os.listdir(pattern)]
    else:
        files = glob.glob(pattern, recursive=True)
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        hint = " (the default corpus is written by `jaxllm data synth --out DIR`)" if "synth" in pattern else ""
        raise DataError(f"data source '{pattern}': no files match (cwd: {os.getcwd()}){hint}")
    return files


def _format_of(cfg: SourceConfig, path: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXT_FORMATS:
        raise DataError(f"{path}: cannot tell the format from extension '{ext}'; set format: "
                        f"one of {sorted(set(_EXT_FORMATS.values()))} in the source config")
    return _EXT_FORMATS[ext]


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: undecodable bytes (not UTF-8) at byte {e.start} of the record: "
                        f"{raw[max(0, e.start - 8):e.end + 8]!r}") from None


def _json_object(raw: bytes, where: str, expected: str) -> dict:
    line = _decode(raw, where)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}): {line[:80]!r}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with {expected}, got {type(obj).__name__}")
    return obj


def _field_text(raw: bytes, field: str, where: str) -> str:
    """One JSON object -> its text field, with an error for each way it can be wrong."""
    obj = _json_object(raw, where, f"field '{field}'")
    if field not in obj:
        raise DataError(f"{where}: missing field '{field}' (fields present: {sorted(obj)[:10]}); "
                        f"set text_field in the source config")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(text).__name__}")
    return text


def _check_text(text: str, where: str) -> Doc:
    if not text.strip():
        raise DataError(f"{where}: empty document")
    check_utf8(text, where)
    return Doc(text, where)


def check_utf8(text: str, where: str) -> None:
    """JSON "\\ud800" escapes decode to unpaired surrogates, which no tokenizer can encode
    (SentencePiece raises a bare RuntimeError); refuse them here, with the location."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: text is not valid UTF-8 (unpaired surrogate)") from None


class _Files:
    """Lazily opened, read-only memory maps, at most `max_open` at a time (least recently used
    closed first: every map holds a file descriptor). Not pickled: grain workers reopen their
    own. Reads copy the bytes out under a lock, so an eviction never closes a map in use."""

    def __init__(self, paths, max_open: int = 64):
        self.paths = list(paths)
        self.max_open = max(1, int(max_open))
        self._maps: collections.OrderedDict[int, mmap.mmap | bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"paths": self.paths, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["paths"], state.get("max_open", 64))

    def _get(self, i: int):
        m = self._maps.get(i)
        if m is not None:
            self._maps.move_to_end(i)
            return m
        with open(self.paths[i], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._maps[i] = m
        while len(self._maps) > self.max_open:
            _, old = self._maps.popitem(last=False)
            if isinstance(old, mmap.mmap):
                old.close()
        return m

    def scan(self, i: int, fn):
        """fn(memory map of file i), under the lock: searching a long record in place."""
        with self._lock:
            return fn(self._get(i))

    def read(self, i: int, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of file i (a copy)."""
        with self._lock:
            m = self._get(i)
            return bytes(m[start:len(m) if end is None else end])

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                if isinstance(m, mmap.mmap):
                    m.close()
            self._maps.clear()


_NON_WS = np.ones(256, dtype=np.uint8)
_NON_WS[[9, 10, 13, 32]] = 0


def _line_index(path: str, chunk_size: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, 1-based line number) of every non-blank line. Reads the file in chunks, so
    memory is one chunk plus ~9 bytes per line, whatever the file size."""
    nl_parts, cr_parts, solid_parts = [], [], []
    buf = bytearray(chunk_size)
    pos, prev_byte, open_solid = 0, -1, False  # open_solid: the unfinished line has a non-space
    with open(path, "rb") as f:
        while True:
            got = f.readinto(buf)
            if not got:
                break
            c = np.frombuffer(buf, dtype=np.uint8, count=got)
            local = np.flatnonzero(c == 10)
            nl_parts.append(local + pos)
            # A "\r" before the newline is not part of the line (CRLF files).
            before = c[np.maximum(local - 1, 0)]
            if len(local) and local[0] == 0:
                before[0] = prev_byte if prev_byte >= 0 else 0
            cr_parts.append(before == 13)
            # Segments of this chunk: [0, nl0], [nl0+1, nl1], ..., [nl_last+1, end); the first
            # continues the line left open by the previous chunk. Whitespace-only lines are
            # not records (JSONL writers often leave them).
            seg = np.concatenate([[0], local + 1])
            seg = seg[seg < got]
            solid = np.maximum.reduceat(_NON_WS[c], seg).astype(bool) if len(seg) else np.zeros(0, bool)
            if len(solid):
                solid[0] |= open_solid
            closed = len(local)
            if len(solid) > closed:  # the last segment runs to the end of the chunk: still open
                solid_parts.append(solid[:closed])
                open_solid = bool(solid[closed])
            else:
                solid_parts.append(solid)
                open_solid = False
            prev_byte = int(c[-1])
            pos += got
    nl = np.concatenate(nl_parts) if nl_parts else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [pos]]).astype(np.int64)
    last_cr = pos > starts[-1] and prev_byte == 13
    ends = ends - np.concatenate(cr_parts + [[last_cr]]).astype(np.int64) if cr_parts else ends - int(last_cr)
    keep = np.concatenate(solid_parts + [[open_solid]]).astype(bool)
    lines = np.arange(1, len(starts) + 1)
    return starts[keep], ends[keep], lines[keep]


class _RecordSource:
    """Records spread over several files: global index -> (file, index within file).
    Subclasses take (cfg, files, records): `records` (whole JSON objects wanted) only changes
    what Parquet checks when opening."""

    def __init__(self, cfg: SourceConfig, files: list[str], counts: list[int]):
        self.cfg = cfg
        self.files = _Files(files)
        self.offsets = np.cumsum([0] + counts).tolist()
        if self.offsets[-1] == 0:
            raise DataError(f"data source '{cfg.path}': no documents in {files[:5]}"
                            f"{' ...' if len(files) > 5 else ''}")

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        f = bisect.bisect_right(self.offsets, index) - 1
        return f, index - self.offsets[f]

    def __repr__(self):
        return f"{type(self).__name__}({self.cfg.path!r}, {len(self)} records)"

    def where(self, index: int) -> str:
        """"file:line" (or row / record) of a record, without reading it."""
        return self._span(index)[3]

    def _line_span(self, f: int, j: int) -> tuple[int, int, int, str]:
        """(file, start byte, end byte, "file:line") of line record j of file f."""
        starts, ends, lines = self.index[f]
        return f, int(starts[j]), int(ends[j]), f"{self.files.paths[f]}:{lines[j]}"

    def record(self, index: int) -> Record:
        """The whole JSON object of a record (chat data; open_source(..., records=True))."""
        raise NotImplementedError

    def read_pieces(self, index: int, max_chars: int, start: int = 0) -> Iterator[str]:
        """The record's text in pieces of at most `max_chars` characters, from piece `start`
        (see doc_pieces.py): cut in the file bytes where the format allows and the record is
        long, else read whole and cut in memory."""
        streamed = self._streamed_pieces(index, max_chars, start)
        if streamed is None:
            yield from doc_pieces.text_pieces(self[index].text, max_chars, start)
            return
        pieces, where = streamed
        for piece in pieces:
            check_utf8(piece, where)
            yield piece

    def _streamed_pieces(self, index: int, max_chars: int, start: int):
        """(pieces read from the file bytes, where), or None: read the record whole."""
        return None


class JsonlSource(_RecordSource):
    def __init__(self, cfg, files, records: bool = False):
        self.index = [_line_index(p) for p in files]
        super().__init__(cfg, files, [len(s) for s, _, _ in self.index])

    def _span(self, index: int) -> tuple[int, int, int, str]:
        return self._line_span(*self._locate(index))

    def __getitem__(self, index: int) -> Doc:
        f, a, b, where = self._span(index)
        return _check_text(_field_text(self.files.read(f, a, b), self.cfg.text_field, where), where)

    def record(self, index: int) -> Record:
        f, a, b, where = self._span(index)
        return Record(_json_object(self.files.read(f, a, b), where, "'messages' or 'prompt'/'completion'"),
                      where)

    def _streamed_pieces(self, index: int, max_chars: int, start: int):
        f, a, b, where = self._span(index)
        if b - a <= max_chars:  # a character takes at least one byte: it fits in one piece
            return None
        return doc_pieces.json_field_pieces(
            functools.partial(self.files.scan, f), functools.partial(self.files.read, f), a, b,
            functools.partial(_field_text, field=self.cfg.text_field, where=where), where, max_chars,
            start, DataError), where


class TextSource(_RecordSource):
    def __init__(self, cfg, files, records: bool = False):
        self.by_line = cfg.text_unit == "line"
        self.index = [_line_index(p) for p in files] if self.by_line else None
        counts = [len(ix[0]) for ix in self.index] if self.by_line else [1] * len(files)
        super().__init__(cfg, files, counts)

    def _span(self, index: int) -> tuple[int, int, int | None, str]:
        f, j = self._locate(index)
        return self._line_span(f, j) if self.by_line else (f, 0, None, f"{self.files.paths[f]}:1")

    def __getitem__(self, index: int) -> Doc:
        f, a, b, where = self._span(index)
        return _check_text(_decode(self.files.read(f, a, b), where), where)

    def _streamed_pieces(self, index: int, max_chars: int, start: int):
        f, a, b, where = self._span(index)
        b = os.path.getsize(self.files.paths[f]) if b is None else b
        if b - a <= max_chars:
            return None
        return doc_pieces.byte_pieces(functools.partial(self.files.read, f), a, b, max_chars, start,
                                      lambda raw, at: _decode(raw, f"{where} (byte {at - a})")), where


class ParquetSource(_RecordSource):
    """Rows of one string column; reads (and caches) a row group at a time."""

    def __init__(self, cfg, files, records: bool = False):
        import pyarrow.parquet as pq  # optional dependency: the `data` extra
        groups, counts = [], []
        for p in files:
            meta = pq.ParquetFile(p).metadata
            names = [meta.schema.column(i).name for i in range(meta.num_columns)]
            if not records and cfg.text_field not in names:
                raise DataError(f"{p}: no column '{cfg.text_field}' (columns: {names[:10]}); "
                                f"set text_field in the source config")
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            groups.append(np.cumsum([0] + sizes).tolist())
            counts.append(sum(sizes))
        self.groups = groups
        super().__init__(cfg, files, counts)

    @functools.lru_cache(maxsize=4)
    def _group(self, f: int, g: int, whole_rows: bool = False) -> list:
        import pyarrow.parquet as pq
        columns = None if whole_rows else [self.cfg.text_field]
        table = pq.ParquetFile(self.files.paths[f]).read_row_group(g, columns=columns)
        return table.to_pylist() if whole_rows else table.column(0).to_pylist()

    def where(self, index: int) -> str:
        f, j = self._locate(index)
        return f"{self.files.paths[f]}:row {j}"

    def _row(self, index: int, whole_rows: bool = False):
        f, j = self._locate(index)
        g = bisect.bisect_right(self.groups[f], j) - 1
        return self._group(f, g, whole_rows)[j - self.groups[f][g]], f"{self.files.paths[f]}:row {j}"

    def record(self, index: int) -> Record:
        return Record(*self._row(index, whole_rows=True))

    def __getitem__(self, index: int) -> Doc:
        text, where = self._row(index)
        if not isinstance(text, str):
            raise DataError(f"{where}: column '{self.cfg.text_field}' must hold strings, got {text!r:.40}")
        return _check_text(text, where)


class ArrayRecordSource(_RecordSource):
    """Records are a JSON object (like a JSONL line, if they start with '{') or raw UTF-8 text."""

    def __init__(self, cfg, files, records: bool = False):
        from array_record.python import array_record_data_source as ards  # optional dependency
        self._readers = None
        counts = []
        for p in files:
            src = ards.ArrayRecordDataSource([p])
            counts.append(len(src))
            src.__exit__(None, None, None)
        super().__init__(cfg, files, counts)

    def __getstate__(self):
        return dict(self.__dict__, _readers=None)

    def where(self, index: int) -> str:
        f, j = self._locate(index)
        return f"{self.files.paths[f]}:record {j}"

    def _raw(self, index: int) -> tuple[bytes, str]:
        where = self.where(index)
        if self._readers is None:
            from array_record.python import array_record_data_source as ards
            self._readers = ards.ArrayRecordDataSource(self.files.paths)
        return self._readers[index], where

    def record(self, index: int) -> Record:
        raw, where = self._raw(index)
        return Record(_json_object(raw, where, "'messages' or 'prompt'/'completion'"), where)

    def __getitem__(self, index: int) -> Doc:
        raw, where = self._raw(index)
        if raw[:1] == b"{":
            return _check_text(_field_text(raw, self.cfg.text_field, where), where)
        return _check_text(_decode(raw, where), where)


_SOURCES = {"jsonl": JsonlSource, "text": TextSource, "parquet": ParquetSource,
            "arrayrecord": ArrayRecordSource}


def open_source(cfg: SourceConfig, records: bool = False) -> _RecordSource:
    """All files of one source config (same format required) as one random-access source.
    `records`: read whole JSON objects (`record(i)`, chat data) rather than a text field."""
    files = expand_paths(cfg.path)
    formats = {_format_of(cfg, p) for p in files}
    if len(formats) > 1:
        raise DataError(f"data source '{cfg.path}' mixes formats {sorted(formats)}; "
                        f"split it into one source per format")
    fmt = formats.pop()
    if records and fmt == "text":
        raise DataError(f"data source '{cfg.path}' is plain text; chat records must be JSON objects "
                        f"in JSONL, Parquet or ArrayRecord files")
    return _SOURCES[fmt](cfg, files, records=records)


def iter_texts(patterns, text_field: str = "text", text_unit: str = "file",
               max_docs: int | None = None):
    """Every document's text, in file order (for tokenizer training); bad records raise."""
    n = 0
    for pattern in patterns:
        src = open_source(SourceConfig(path=pattern, text_field=text_field, text_unit=text_unit))
        for i in range(len(src)):
            if max_docs is not None and n >= max_docs:
                return
            yield src[i].text
            n += 1
