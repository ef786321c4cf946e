"""Sources: every format, globs and dirs, and a clear file:line error for each kind of bad input."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxllm import configlib
from jaxllm.data.config import DataConfig, SourceConfig
from jaxllm.data.packing import Bad, GuardedSource
from jaxllm.data.sources import DataError, _line_index, open_source


def _texts(src):
    return [src[i].text for i in range(len(src))]


def test_jsonl_reads_records_skipping_blank_lines_and_crlf(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "one"}\r\n\n{"text": "two", "x": 1}\n   \n{"text": "three"}')
    src = open_source(SourceConfig(path=str(p)))
    assert _texts(src) == ["one", "two", "three"]
    # Line numbers count the blank lines: the third record is on line 5.
    assert src[2].where == f"{p}:5"


def test_text_field_is_configurable(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "hello"}\n')
    assert _texts(open_source(SourceConfig(path=str(tmp_path / "a.jsonl"), text_field="body"))) == ["hello"]


def test_globs_and_directories_expand_in_sorted_order(tmp_path):
    for name, t in (("b.jsonl", "B"), ("a.jsonl", "A"), ("c.jsonl", "C")):
        (tmp_path / name).write_text(json.dumps({"text": t}) + "\n")
    assert _texts(open_source(SourceConfig(path=str(tmp_path / "*.jsonl")))) == ["A", "B", "C"]
    assert _texts(open_source(SourceConfig(path=str(tmp_path)))) == ["A", "B", "C"]


def test_plain_text_by_file_and_by_line(tmp_path):
    (tmp_path / "x.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "y.txt").write_text("another file")
    assert _texts(open_source(SourceConfig(path=str(tmp_path / "*.txt")))) == \
        ["first line\n\nsecond line\n", "another file"]
    by_line = open_source(SourceConfig(path=str(tmp_path / "*.txt"), text_unit="line"))
    assert _texts(by_line) == ["first line", "second line", "another file"]
    assert by_line[1].where == f"{tmp_path / 'x.txt'}:3"


def test_parquet_rows_across_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"document {i}" for i in range(25)]
    pq.write_table(pa.table({"text": texts, "id": list(range(25))}), tmp_path / "d.parquet", row_group_size=7)
    src = open_source(SourceConfig(path=str(tmp_path / "d.parquet")))
    assert _texts(src) == texts
    assert src[10].where == f"{tmp_path / 'd.parquet'}:row 10"
    with pytest.raises(DataError, match=r"d.parquet: no column 'body' \(columns: \['text', 'id'\]\)"):
        open_source(SourceConfig(path=str(tmp_path / "d.parquet"), text_field="body"))


def test_array_record_json_and_raw_records(tmp_path):
    ar = pytest.importorskip("array_record.python.array_record_module")
    w = ar.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for rec in (b'{"text": "json doc"}', "raw text doc ✓".encode()):
        w.write(rec)
    w.close()
    assert _texts(open_source(SourceConfig(path=str(tmp_path / "d.array_record")))) == ["json doc", "raw text doc ✓"]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "unterminated\n', r"bad.jsonl:2: malformed JSON"),
    (b'{"text": "ok"}\n\n{"body": "x"}\n', r"bad.jsonl:3: missing field 'text' \(fields present: \['body'\]\)"),
    (b'{"text": "   "}\n', r"bad.jsonl:1: empty document"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad.jsonl:2: undecodable bytes \(not UTF-8\)"),
    (b'{"text": 5}\n', r"bad.jsonl:1: field 'text' must be a string, got int"),
    (b'["text"]\n', r"bad.jsonl:1: expected a JSON object"),
    (b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', r"bad.jsonl:2: text is not valid UTF-8 \(unpaired surrogate\)"),
])
def test_each_bad_record_names_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    src = open_source(SourceConfig(path=str(tmp_path / "bad.jsonl")))
    with pytest.raises(DataError, match=message):
        for i in range(len(src)):
            src[i]


def test_empty_sources_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"no files match"):
        open_source(SourceConfig(path=str(tmp_path / "missing-*.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"no documents in"):
        open_source(SourceConfig(path=str(tmp_path / "empty.jsonl")))


def test_unknown_extension_and_mixed_formats_are_errors(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"a.csv: cannot tell the format from extension '.csv'"):
        open_source(SourceConfig(path=str(tmp_path / "a.csv")))
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(DataError, match=r"mixes formats \['jsonl', 'text'\]"):
        open_source(SourceConfig(path=str(tmp_path / "[bc].*")))


def test_data_config_loads_from_yaml_with_nested_sources(tmp_path):
    (tmp_path / "d.yaml").write_text(
        "kind: text\ntokenizer: tok\nsources:\n"
        "  - {path: 'a/*.jsonl', weight: 3}\n  - {path: b.parquet, text_field: body}\n"
        "eval_sources: ['e.jsonl']\npacking: best_fit\n")
    cfg = configlib.load(DataConfig, tmp_path / "d.yaml")
    assert cfg.sources == (SourceConfig(path="a/*.jsonl", weight=3.0),
                           SourceConfig(path="b.parquet", text_field="body"))
    assert cfg.eval_sources == (SourceConfig(path="e.jsonl"),) and cfg.packing == "best_fit"


@pytest.mark.parametrize("yaml_text, message", [
    ("kind: text\nsources: [{path: a, wieght: 2}]\n",
     r"line 2: unknown key 'sources\[0\].wieght'; did you mean 'sources\[0\].weight'"),
    ("kind: text\nsources: [{path: a, format: csv}]\n", r"line 2: key 'sources\[0\].format' must be one of"),
    ("kind: text\nsources: [{path: a, weight: -1}]\n", r"weight must be a positive number"),
    ("kind: text\n", r"needs at least one entry in data.sources"),
    ("kind: text\nsources: [a]\npacking: firstfit\n", r"did you mean 'first_fit'"),
])
def test_bad_data_config_is_a_clear_error(tmp_path, yaml_text, message):
    (tmp_path / "d.yaml").write_text(yaml_text)
    with pytest.raises(configlib.ConfigError, match=message):
        configlib.load(DataConfig, tmp_path / "d.yaml")


def test_unpaired_surrogate_is_skipped_and_counted_or_raises_with_location(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "x\\udc00y"}\n')  # valid JSON, not encodable
    src = open_source(SourceConfig(path=str(p)))
    with pytest.raises(DataError, match=r"s.jsonl:2: text is not valid UTF-8"):
        GuardedSource(src, skip_bad_records=False)[1]
    bad = GuardedSource(src, skip_bad_records=True)[1]
    assert isinstance(bad, Bad) and bad[0] == f"{p}:2"
    assert GuardedSource(src, skip_bad_records=True)[0].text == "fine"


def test_line_index_in_small_chunks_matches_a_whole_file_scan(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "f.jsonl"
    for _ in range(300):
        data = bytes(rng.choice(list(b"\n\r \tab{"), size=rng.integers(0, 50)))
        p.write_bytes(data)
        whole = _line_index(str(p))
        for chunk in (1, 2, 3, 7):
            assert all(np.array_equal(a, b) for a, b in zip(whole, _line_index(str(p), chunk)))
    p.write_bytes(b'\r\n{"a"}\r\n \t\n\n{"b"}\r')
    starts, ends, lines = _line_index(str(p), 3)
    assert starts.tolist() == [2, 13] and ends.tolist() == [7, 18] and lines.tolist() == [2, 5]


def test_many_files_read_under_a_low_open_file_limit(tmp_path):
    # One open map per file once exhausted the file descriptors (>1000 input files); maps
    # are now a bounded LRU. 300 files, soft limit 200, every record read twice, in a
    # random order, and through a pickled copy (what a grain worker gets).
    for i in range(300):
        (tmp_path / f"f{i:04d}.jsonl").write_text(f'{{"text": "doc {i} a"}}\n\n{{"text": "doc {i} b"}}\n')
    script = textwrap.dedent(f"""
        import pickle, random, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
        from jaxllm.data.config import SourceConfig
        from jaxllm.data.sources import open_source
        src = open_source(SourceConfig(path={str(tmp_path)!r}))
        assert len(src) == 600
        order = list(range(600)) * 2
        random.Random(0).shuffle(order)
        for s in (src, pickle.loads(pickle.dumps(src))):
            got = {{i: s[i] for i in order}}
            assert all(got[2 * k].text == f"doc {{k}} a" and got[2 * k + 1].text == f"doc {{k}} b"
                       for k in range(300))
            assert got[599].where.endswith("f0299.jsonl:3")
            assert len(s.files._maps) <= s.files.max_open
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.getcwd())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
