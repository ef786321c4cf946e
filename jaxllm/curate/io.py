"""Reading raw shards and writing curated ones.

Readers stream one shard at a time and never raise on a bad record: a line that is not
UTF-8, not JSON or not an object, or a record without a string text field, is counted under
`read/<reason>` in the stats and skipped. A UTF-8 byte-order mark at the start of a line is
stripped (Windows tools write one at the start of a file). A file that cannot be read to its
end (missing, corrupt Parquet, truncated or corrupt gzip) raises BadShardError naming it: the
runners stop, or with input.skip_bad_shards=true drop the whole shard and name it in the
report. Every record gets an order key, shard index << 32 | record index, which fixes
"first in input order" for dedup on every runner.

Files are opened through `open_fn(path, mode)` (binary), so the Beam runner can pass Beam's
FileSystems and read or write gs://, s3:// or hdfs:// paths with the same code.
"""
from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import zlib
from collections import Counter
from typing import BinaryIO, Callable, Iterable, Iterator

from jaxllm.curate.config import InputConfig, OutputConfig
from jaxllm.errors import UserError

OpenFn = Callable[[str, str], BinaryIO]
# What a damaged file raises while it is read: I/O, gzip (EOFError, BadGzipFile, zlib.error),
# Parquet (pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError).
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)


class InputError(UserError):
    """input.* names no usable files (empty, no match, unknown format)."""


class BadShardError(InputError):
    """An input file cannot be read to its end; the message names it and the way out."""

    def __init__(self, path: str, cause: str):
        super().__init__(path, cause)   # args rebuild it when a pool worker pickles it
        self.path, self.cause = path, cause

    def __str__(self) -> str:
        return (f"cannot read input file {self.path} ({self.cause}); replace or remove it, "
                f"or set input.skip_bad_shards=true to skip it (the report names it)")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def local_open(path: str, mode: str) -> BinaryIO:
    if "w" in mode:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, mode)


@dataclasses.dataclass
class Record:
    order: int
    id: str
    text: str
    url: str | None = None

    def to_json(self) -> dict:
        d = {"id": self.id, "text": self.text}
        if self.url is not None:
            d["url"] = self.url
        return d


def order_key(shard_index: int, record_index: int) -> int:
    return (shard_index << 32) | record_index


def list_shards(cfg: InputConfig) -> list[str]:
    if not cfg.paths:
        raise InputError("input.paths is empty: give one or more glob patterns of JSONL or Parquet files")
    found: set[str] = set()
    for pattern in cfg.paths:
        found.update(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not found:
        raise InputError(f"input.paths {list(cfg.paths)} matched no files; check the patterns "
                         f"(relative ones are relative to the recipe file, or to the current "
                         f"directory when given on the command line)")
    return sorted(found)


def shard_format(path: str, cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    name = path.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise InputError(f"cannot tell the format of {path} from its suffix "
                     f"(.jsonl[.gz] or .parquet); set input.format")


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for suf in (".gz", ".jsonl", ".json", ".ndjson", ".parquet"):
        base = base.removesuffix(suf)
    return base


def _make_record(obj, shard_index: int, i: int, stem: str, cfg: InputConfig,
                 stats: Counter) -> Record | None:
    if not isinstance(obj, dict):
        stats["read/bad_json"] += 1
        return None
    text = obj.get(cfg.text_field)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            stats["read/bad_utf8"] += 1
            return None
    if not isinstance(text, str):
        stats["read/no_text"] += 1
        return None
    try:
        text.encode("utf-8")   # JSON "\ud800" decodes to an unpaired surrogate
    except UnicodeEncodeError:
        stats["read/bad_utf8"] += 1
        return None
    if not text.strip():
        stats["read/empty_text"] += 1
        return None
    url = obj.get(cfg.url_field)
    rid = obj.get(cfg.id_field)
    return Record(order_key(shard_index, i), str(rid) if rid is not None else f"{stem}-{i}",
                  text, url if isinstance(url, str) else None)


def _jsonl_objects(f: BinaryIO, stats: Counter) -> Iterator[tuple[int, object]]:
    for i, raw in enumerate(f):
        if not raw.strip():
            continue
        stats["read/records"] += 1
        raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["read/bad_utf8"] += 1
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError:
            stats["read/bad_json"] += 1


def _parquet_objects(f: BinaryIO, cfg: InputConfig, stats: Counter) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        cols = [c for c in (cfg.text_field, cfg.url_field, cfg.id_field) if c in names]
        i = 0
        for batch in pf.iter_batches(batch_size=1024, columns=cols or None):
            for row in batch.to_pylist():
                stats["read/records"] += 1
                yield i, row
                i += 1
    except pa.ArrowException as e:   # the few Arrow errors that are neither OSError nor ValueError
        if isinstance(e, _READ_ERRORS):
            raise
        raise OSError(_describe(e)) from e


def read_shard(path: str, shard_index: int, cfg: InputConfig, stats: Counter,
               open_fn: OpenFn = local_open) -> Iterator[Record]:
    """Stream the good records of one shard; count the bad ones in `stats`.

    Raises BadShardError when the file cannot be read to its end; records yielded before
    that came from a damaged file, so a caller that skips the shard drops them too."""
    fmt = shard_format(path, cfg)
    stem = _stem(path)
    try:
        f = open_fn(path, "rb")
    except OSError as e:
        raise BadShardError(path, _describe(e)) from None
    with f:
        stream = gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f
        objs = _jsonl_objects(stream, stats) if fmt == "jsonl" else _parquet_objects(stream, cfg, stats)
        while True:
            try:
                i, obj = next(objs)
            except StopIteration:
                return
            except _READ_ERRORS as e:
                raise BadShardError(path, _describe(e)) from None
            rec = _make_record(obj, shard_index, i, stem, cfg, stats)
            if rec is not None:
                yield rec


def output_name(shard_index: int, n_shards: int, cfg: OutputConfig) -> str:
    ext = "jsonl" if cfg.format == "jsonl" else "array_record"
    return f"part-{shard_index:05d}-of-{n_shards:05d}.{ext}"


# Exactly the names output_name makes: the only files in output.dir a run ever replaces.
OUTPUT_NAME_RE = re.compile(r"part-\d{5}-of-\d{5}\.(?:jsonl|array_record)")


def is_output_name(name: str) -> bool:
    return OUTPUT_NAME_RE.fullmatch(name) is not None


def write_shard(path: str, records: Iterable[dict], cfg: OutputConfig,
                open_fn: OpenFn = local_open) -> int:
    """Write records as JSONL lines, or as ArrayRecord records holding the same JSON bytes
    (what grain's ArrayRecordDataSource yields). Returns the number written."""
    lines = (json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records)
    n = 0
    if cfg.format == "jsonl":
        with open_fn(path, "wb") as f:
            for line in lines:
                f.write(line + b"\n")
                n += 1
        return n
    from array_record.python.array_record_module import ArrayRecordWriter
    # ArrayRecord writes to a local path; stage there, then copy through open_fn.
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "shard.array_record")
        w = ArrayRecordWriter(local, "group_size:1")
        for line in lines:
            w.write(line)
            n += 1
        w.close()
        with open(local, "rb") as src, open_fn(path, "wb") as dst:
            dst.write(src.read())
    return n


def read_output_shard(path: str) -> list[dict]:
    """Read back a curated shard (JSONL or ArrayRecord), for tests and tools."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            return [json.loads(line) for line in f if line.strip()]
    from array_record.python.array_record_module import ArrayRecordReader
    r = ArrayRecordReader(path)
    out = [json.loads(b) for b in r.read_all()] if r.num_records() else []
    r.close()
    return out

