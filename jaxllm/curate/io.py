"""Reading raw shards and writing curated ones.

Readers stream one shard at a time and never raise on a bad record: a line that is not
UTF-8, not JSON or not an object, or a record without a string text field, is counted under
`read/<reason>` in the stats and skipped. An unreadable file (missing, corrupt Parquet) is
counted as `read/unreadable_shard`. Every record gets an order key, shard index << 32 |
record index, which fixes "first in input order" for dedup on every runner.

Files are opened through `open_fn(path, mode)` (binary), so the Beam runner can pass Beam's
FileSystems and read or write gs://, s3:// or hdfs:// paths with the same code.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import tempfile
from collections import Counter
from typing import BinaryIO, Callable, Iterable, Iterator

from jaxllm.curate.config import InputConfig, OutputConfig

OpenFn = Callable[[str, str], BinaryIO]


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
        raise ValueError("input.paths is empty: give one or more glob patterns of JSONL or Parquet files")
    found: set[str] = set()
    for pattern in cfg.paths:
        found.update(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not found:
        raise ValueError(f"input.paths {list(cfg.paths)} matched no files")
    return sorted(found)


def shard_format(path: str, cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    name = path.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"cannot tell the format of {path} from its suffix "
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
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(f)
    names = set(pf.schema_arrow.names)
    cols = [c for c in (cfg.text_field, cfg.url_field, cfg.id_field) if c in names]
    i = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols or None):
        for row in batch.to_pylist():
            stats["read/records"] += 1
            yield i, row
            i += 1


def read_shard(path: str, shard_index: int, cfg: InputConfig, stats: Counter,
               open_fn: OpenFn = local_open) -> Iterator[Record]:
    """Stream the good records of one shard; count the bad ones in `stats`."""
    fmt = shard_format(path, cfg)
    stem = _stem(path)
    try:
        f = open_fn(path, "rb")
    except OSError:
        stats["read/unreadable_shard"] += 1
        return
    with f:
        stream = gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f
        objs = _jsonl_objects(stream, stats) if fmt == "jsonl" else _parquet_objects(stream, cfg, stats)
        try:
            for i, obj in objs:
                rec = _make_record(obj, shard_index, i, stem, cfg, stats)
                if rec is not None:
                    yield rec
        except (OSError, EOFError, ValueError):  # truncated gzip, corrupt Parquet, ...
            stats["read/unreadable_shard"] += 1


def output_name(shard_index: int, n_shards: int, cfg: OutputConfig) -> str:
    ext = "jsonl" if cfg.format == "jsonl" else "array_record"
    return f"part-{shard_index:05d}-of-{n_shards:05d}.{ext}"


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

