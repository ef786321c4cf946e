"""data.max_doc_chars: a document longer than that is read in pieces, so reading memory stays
bounded whatever the record size, every character and token survives, and resume is exact."""
import dataclasses
import gc
import hashlib
import json
import pathlib
import re
import sys
import tracemalloc

import pytest

from jaxllm.data import packing, pipeline, synthetic
from jaxllm.data.config import DataConfig, SourceConfig
from jaxllm.data.doc_pieces import text_pieces
from jaxllm.data.sources import DataError, open_source
from jaxllm.data.tokenizer import train_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_data_pipeline import _take  # noqa: E402

PIECE = 200_000
TAIL = ' "quoted" back\\slash\ttab\nnewline é 日本語 🙂 '  # escapes, 2-4 byte UTF-8, a surrogate pair


def _long_text(n_chars: int, seed: int) -> str:
    parts, size = [], 0
    for i, doc in enumerate(synthetic.pretrain_docs(10 ** 9, seed=seed)):
        parts.append(doc.replace("\n", " ") + (TAIL if i % 7 == 0 else " "))
        size += len(parts[-1])
        if size >= n_chars:
            return "".join(parts)[:n_chars]


def _digest(pieces, max_chars):
    h, n, longest = hashlib.sha1(), 0, 0
    for p in pieces:
        h.update(p.encode("utf-8", "surrogatepass"))
        n, longest = n + 1, max(longest, len(p))
    return h.hexdigest(), n, longest


def _peak_while_reading(src, max_chars):
    gc.collect()
    tracemalloc.start()
    try:
        digest = _digest(src.read_pieces(0, max_chars), max_chars)
        return digest, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("layout", ["jsonl_ascii_escapes", "jsonl_utf8", "text_line", "text_file"])
def test_a_long_record_is_read_in_bounded_pieces_that_lose_nothing(tmp_path, layout):
    peaks = []
    for mb in (10, 20):
        text = _long_text(mb * 1_000_000, seed=mb)
        want = hashlib.sha1(text.encode()).hexdigest()
        if layout.startswith("jsonl"):
            path = tmp_path / f"{mb}.jsonl"
            line = json.dumps({"id": 1, "text": text, "meta": {"text": "nested"}},
                              ensure_ascii=layout == "jsonl_ascii_escapes")
            path.write_text(line + "\n", encoding="utf-8")
            cfg = SourceConfig(path=str(path))
        else:
            path = tmp_path / f"{mb}.txt"
            path.write_text(text.replace("\n", " ") if layout == "text_line" else text, encoding="utf-8")
            want = hashlib.sha1(path.read_bytes()).hexdigest()
            cfg = SourceConfig(path=str(path), text_unit="line" if layout == "text_line" else "file")
        size = path.stat().st_size
        del text
        src = open_source(cfg)
        (digest, n, longest), peak = _peak_while_reading(src, PIECE)
        assert digest == want                          # the pieces are exactly the document
        assert longest <= PIECE and n >= mb * 1_000_000 // PIECE
        # a few copies of one piece (bytes, decoded text at up to 4 bytes a character) ...
        assert peak < 16 * PIECE < size / 3, (peak, size)
        peaks.append(peak)
    assert peaks[1] < 1.25 * peaks[0] + 200_000, peaks  # ... and nothing growing with the record


def test_cuts_fall_before_a_space_and_respect_escapes(tmp_path):
    text = ("word " * 30 + "\\\\u00e9 \"🙂\" ") * 200
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")   # ensure_ascii: \ud83d\ude42 pairs
    for pieces in (list(open_source(SourceConfig(path=str(path))).read_pieces(0, 2500)),  # file bytes
                   list(text_pieces(text, 2500))):                                      # in memory
        assert "".join(pieces) == text and len(pieces) > 10
        assert all(p.startswith(" ") for p in pieces[1:]) and max(map(len, pieces)) <= 2500


def test_a_bad_string_deep_in_a_long_line_names_the_record(tmp_path):
    text = "a b " * 5000
    (tmp_path / "b.jsonl").write_text('{"text": "' + text + '\\x ' + text + '"}\n')
    src = open_source(SourceConfig(path=str(tmp_path / "b.jsonl")))
    with pytest.raises(DataError, match=r"b.jsonl:1: bad JSON string near byte \d+ of the line"):
        list(src.read_pieces(0, 1000))
    (tmp_path / "c.jsonl").write_text('{"text": "' + text + '", oops}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: malformed JSON .*1 long string left out"):
        list(open_source(SourceConfig(path=str(tmp_path / "c.jsonl"))).read_pieces(0, 1000))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(synthetic.pretrain_docs(1500, seed=3), tmp_path_factory.mktemp("tok"), 400)


def _docs_file(tmp_path, fmt="jsonl"):
    docs = list(synthetic.pretrain_docs(30, seed=4))
    docs[3] = _long_text(40_000, seed=5)
    docs[20] = _long_text(25_000, seed=6)
    if fmt == "parquet":  # read whole, cut in memory
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    else:                 # cut in the file bytes
        synthetic.write_jsonl(str(tmp_path / "d.jsonl"), docs)
    return docs, str(tmp_path / f"d.{fmt}")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_pipeline_keeps_every_token_of_a_long_document(tok, tmp_path, fmt):
    docs, path = _docs_file(tmp_path, fmt)
    cfg = DataConfig(kind="text", sources=[path], eval_sources=[path], max_doc_chars=1000, packing_bins=1,
                     num_shards=1)
    it = pipeline.make_eval_iterator(cfg, seq_len=128, global_batch_size=1, process_index=0,
                                     process_count=1, tokenizer=tok)
    stream = [t for b in it for t in b["tokens"][0][b["segment_ids"][0] > 0].tolist()]
    # cuts fall before spaces, which are word boundaries to the tokenizer: the pieces'
    # tokens are exactly the whole documents' tokens
    assert stream == [t for d in docs for t in tok.encode(d, add_bos=True, add_eos=True)]
    assert it.stats["documents"] == len(docs)
    assert it.stats["doc_pieces"] >= (40_000 + 25_000) // 1000 - 2


def test_resume_inside_a_long_document_is_exact(tok, tmp_path):
    _, path = _docs_file(tmp_path)
    cfg = DataConfig(kind="text", sources=[path], max_doc_chars=500)

    def take(n, state=None):
        return _take(cfg, tok, n, state=state, B=4, T=64)

    full, _ = take(30)
    inside = None
    for k in range(5, 25):
        _, state = take(k)
        if re.search(r'"done": [1-9]', json.dumps(state)):   # a shard stopped mid-document
            inside = k
            break
    assert inside is not None
    rest, _ = take(5, state=json.loads(json.dumps(state)))
    assert all((a[key] == b[key]).all() for a, b in zip(rest, full[inside:inside + 5]) for key in a)


def test_bad_long_record_is_skipped_and_counted_when_asked(tok, tmp_path):
    text = "a b " * 5000
    good = [json.dumps({"text": f"document {i}."}) for i in range(5)]
    (tmp_path / "b.jsonl").write_text("\n".join(good + ['{"text": "' + text + '\\x ' + text + '"}']) + "\n")
    cfg = DataConfig(kind="text", sources=[str(tmp_path / "b.jsonl")], eval_sources=[str(tmp_path / "b.jsonl")],
                     max_doc_chars=1000, skip_bad_records=True)
    it = pipeline.make_eval_iterator(cfg, seq_len=64, global_batch_size=2, process_index=0, process_count=1,
                                     tokenizer=tok)
    list(it)
    it.close()
    # the long record's first pieces were used before its bad string was reached
    assert (it.stats["skipped_records"], it.stats["documents"]) == (1, 6)
    assert it.stats["doc_pieces"] >= 1
    with pytest.raises(DataError, match="b.jsonl:6: bad JSON string"):   # found while counting batches
        list(pipeline.make_eval_iterator(dataclasses.replace(cfg, skip_bad_records=False), seq_len=64,
                                         global_batch_size=2, process_index=0, process_count=1, tokenizer=tok))
    strict = pipeline.make_eval_iterator(dataclasses.replace(cfg, skip_bad_records=False), seq_len=64,
                                         global_batch_size=2, process_index=0, process_count=1, tokenizer=tok,
                                         num_batches=400)   # no count: the error comes while iterating
    with pytest.raises(DataError, match="b.jsonl:6: bad JSON string"):
        list(strict)
    # a pipeline that raised has closed itself (its threads are not left to the garbage collector)
    with pytest.raises(ValueError, match="closed iterator"):
        next(strict)
    with pipeline.closing_batches(pipeline.make_eval_iterator(
            cfg, seq_len=64, global_batch_size=2, process_index=0, process_count=1, tokenizer=tok)) as it:
        next(it)
    with pytest.raises(ValueError, match="closed iterator"):
        next(it)


def test_max_doc_chars_is_checked():
    with pytest.raises(ValueError, match="data.max_doc_chars must be 0 .* or at least 64"):
        DataConfig(kind="text", sources=["x"], max_doc_chars=10)
    assert packing.STATS_NAMES.index("doc_pieces") == packing.DOC_PIECE


def test_reading_resumes_exactly_at_every_piece_and_after_a_bad_record(tmp_path):
    import grain
    text = "a b " * 1000
    good = [json.dumps({"text": f"document {i}."}) for i in range(3)]
    lines = good[:1] + [json.dumps({"text": text})] + ['{"text": "' + text + '\\x ' + text + '"}'] + good[1:]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(SourceConfig(path=str(tmp_path / "r.jsonl")))

    def reader():
        ds = grain.MapDataset.source(packing.LazyDocs(src)).to_iter_dataset()
        return iter(packing.ReadPieces(ds, 1000, skip=True))

    def key(x):
        return (type(x).__name__,) + tuple(x)

    it, states, outs = reader(), [], []
    for x in it:
        states.append(it.get_state())
        outs.append(key(x))
    it.close()   # closed here, not by the garbage collector (pipeline.closing_batches says why)
    assert [o[0] for o in outs].count("Bad") == 1 and len(outs) > 10
    for i, state in enumerate(states):
        again = reader()
        again.set_state(json.loads(json.dumps(state)))
        assert [key(x) for x in again] == outs[i + 1:], i
        again.close()
