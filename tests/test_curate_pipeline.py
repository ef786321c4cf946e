"""End to end: readers, local and Beam runners, report, classifier, CLI."""
import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from jaxllm import configlib
from jaxllm.curate import classifier, config, io, runner_local, synthetic
from jaxllm.curate.config import ClassifierConfig, InputConfig, OutputConfig
from jaxllm.errors import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent


def write_jsonl(path, docs, extra_lines=()):
    with open(path, "wb") as f:
        for d in docs:
            f.write((json.dumps(d) + "\n").encode())
        for raw in extra_lines:
            f.write(raw + b"\n")


def make_corpus(tmp_path, n=160, shards=3, seed=0):
    docs, truth = synthetic.planted_corpus(n, dup_frac=0.15, exact_frac=0.05, junk_frac=0.1,
                                           n_words=150, seed=seed)
    docs[0]["text"] += " Contact admin@corp.example.com from 10.0.0.1 today."
    docs[1]["url"] = "https://www.pornhub.com/x"
    raw = tmp_path / "raw"
    raw.mkdir()
    per = (len(docs) + shards - 1) // shards
    for s in range(shards):
        bad = [b'{"text": "caf\xe9 latin-1 bytes"}', b"{not json", b'{"body": "no text field"}'] if s == 0 else []
        write_jsonl(raw / f"shard{s}.jsonl", docs[s * per:(s + 1) * per], bad)
    return raw, docs, truth


def curate_cfg(raw, out, *overrides):
    return config.load(None, [f"input.paths=[{raw}/*.jsonl]", f"output.dir={out}", *overrides])


def read_dir(out):
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).glob("part-*"))}


def test_readers_count_bad_records_instead_of_failing(tmp_path):
    p = tmp_path / "a.jsonl"
    write_jsonl(p, [{"text": "good one", "url": "u"}, {"text": ""}, {"text": 5}, ["list"]],
                [b'{"text": "\xff\xfe"}', b"{oops", b""])
    stats = Counter()
    recs = list(io.read_shard(str(p), 3, InputConfig(), stats))
    assert [(r.text, r.url, r.id, r.order) for r in recs] == [("good one", "u", "a-0", 3 << 32)]
    assert stats == {"read/records": 6, "read/empty_text": 1, "read/no_text": 1,
                     "read/bad_json": 2, "read/bad_utf8": 1}
    with pytest.raises(io.BadShardError, match="missing.jsonl"):
        list(io.read_shard(str(tmp_path / "missing.jsonl"), 0, InputConfig(), Counter()))


def test_unpaired_surrogate_is_a_bad_record_not_a_crash(tmp_path):
    raw, docs, truth = make_corpus(tmp_path)
    ref = runner_local.run(curate_cfg(raw, tmp_path / "ref", "language.enabled=false"),
                           log=lambda *_: None)
    # "\ud800" is valid JSON but decodes to a lone surrogate, which UTF-8 cannot encode.
    with open(raw / "shard1.jsonl", "ab") as f:
        f.write(b'{"text": "lone \\ud800 surrogate here"}\n')
    stats = Counter()
    recs = list(io.read_shard(str(raw / "shard1.jsonl"), 1, InputConfig(), stats))
    assert stats["read/bad_utf8"] == 1 and not any("surrogate" in r.text for r in recs)
    for lang in ("false", "true"):
        rep = runner_local.run(curate_cfg(raw, tmp_path / f"out-{lang}", f"language.enabled={lang}"),
                               log=lambda *_: None)
        assert rep["input"]["bad_records"]["bad_utf8"] == 2
        assert rep["input"]["records"] == ref["input"]["records"] + 1
    assert read_dir(tmp_path / "out-false") == read_dir(tmp_path / "ref")


def test_setup_error_fails_fast_with_a_process_pool(tmp_path):
    raw, _, _ = make_corpus(tmp_path, n=20, shards=2)
    cfg = curate_cfg(raw, tmp_path / "out", "runner.processes=2",
                     f"url.blocklist_files=[{tmp_path / 'missing.txt'}]")
    # Before the fix the spawn pool respawned failing initializers forever.
    with pytest.raises(UserError, match="missing.txt"):
        runner_local.run(cfg, log=lambda *_: None)


def test_parquet_input_with_nulls_and_binary_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": pa.array([b"hello there", None, b"\xff bad", b"again"], pa.binary()),
                             "url": ["a", None, "c", "d"]}), tmp_path / "x.parquet")
    stats = Counter()
    recs = list(io.read_shard(str(tmp_path / "x.parquet"), 0, InputConfig(text_field="content"), stats))
    assert [(r.text, r.url) for r in recs] == [("hello there", "a"), ("again", "d")]
    assert stats == {"read/records": 4, "read/no_text": 1, "read/bad_utf8": 1}
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(io.BadShardError, match="broken.parquet"):
        list(io.read_shard(str(tmp_path / "broken.parquet"), 0, InputConfig(), Counter()))


def test_local_runner_end_to_end_report_and_process_invariance(tmp_path):
    raw, docs, truth = make_corpus(tmp_path)
    rep1 = runner_local.run(curate_cfg(raw, tmp_path / "out1"), log=lambda *_: None)
    rep2 = runner_local.run(curate_cfg(raw, tmp_path / "out2", "runner.processes=2"), log=lambda *_: None)
    assert read_dir(tmp_path / "out1") == read_dir(tmp_path / "out2")
    assert rep1 == rep2
    assert rep1["input"]["bad_records"] == {"bad_json": 1, "bad_utf8": 1, "no_text": 1}
    stages = {s["stage"]: s for s in rep1["stages"]}
    assert stages["url"]["removed"] == {"domain": 1}
    assert sum(stages["exact_dedup"]["removed"].values()) == 8          # 5% of 160 planted
    assert sum(stages["near_dedup"]["removed"].values()) >= 18          # of 24 planted
    junk_removed = sum(sum(stages[s]["removed"].values()) for s in
                       ("gopher_repetition", "gopher_quality", "c4", "fineweb", "language"))
    assert junk_removed >= 16                                           # 16 junk documents
    out = [d for p in sorted((tmp_path / "out1").glob("part-*")) for d in io.read_output_shard(str(p))]
    assert len(out) == rep1["output"]["docs"] and set(out[0]) >= {"id", "text"}
    assert not any("admin@corp" in d["text"] or "10.0.0.1" in d["text"] for d in out)
    assert not any(d["id"].startswith("junk") for d in out)
    ids = [d["id"] for d in out]
    assert len(ids) == len(set(ids))
    for name in ("report.json", "report_stages.png", "report_words_input.png"):
        assert (tmp_path / "out1" / name).stat().st_size > 0
    # Kept + removed add up at every stage, and stages chain.
    prev = None
    for s in rep1["stages"]:
        assert s["kept"] + sum(s["removed"].values()) == s["in"]
        if prev is not None and s["stage"] not in ("near_dedup",):
            assert s["in"] == prev["kept"]
        prev = s


def test_arrayrecord_output_holds_the_same_documents(tmp_path):
    raw, _, _ = make_corpus(tmp_path, n=60, shards=2)
    runner_local.run(curate_cfg(raw, tmp_path / "j"), log=lambda *_: None)
    runner_local.run(curate_cfg(raw, tmp_path / "a", "output.format=arrayrecord"), log=lambda *_: None)
    j = [d for p in sorted((tmp_path / "j").glob("part-*")) for d in io.read_output_shard(str(p))]
    a = [d for p in sorted((tmp_path / "a").glob("part-*")) for d in io.read_output_shard(str(p))]
    assert j == a and len(j) > 0
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    src = ArrayRecordDataSource([str(p) for p in sorted((tmp_path / "a").glob("part-*"))])
    assert json.loads(src[0])["text"] == j[0]["text"]


def _beam_python():
    try:
        import apache_beam  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    cand = os.environ.get("JAXLLM_BEAM_PYTHON") or str(REPO / ".venv-beam" / "bin" / "python")
    return cand if os.path.exists(cand) else None


@pytest.mark.skipif(_beam_python() is None, reason="apache-beam is not importable and no Beam venv "
                    "was found (set JAXLLM_BEAM_PYTHON or create .venv-beam)")
def test_beam_runner_matches_local_runner(tmp_path):
    raw, _, _ = make_corpus(tmp_path, n=120, shards=3, seed=7)
    local = runner_local.run(curate_cfg(raw, tmp_path / "local"), log=lambda *_: None)
    code = ("import sys, json; from jaxllm.curate import config, runner_beam; "
            "cfg = config.load(None, sys.argv[1:]); runner_beam.run(cfg, log=lambda *_: None)")
    subprocess.run([_beam_python(), "-c", code, f"input.paths=[{raw}/*.jsonl]",
                    f"output.dir={tmp_path / 'beam'}", "runner.kind=beam"],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=240)
    assert read_dir(tmp_path / "beam") == read_dir(tmp_path / "local")
    assert json.loads((tmp_path / "beam" / "report.json").read_text()) == local


def test_classifier_separates_reference_text_from_crawl_and_gates_documents(tmp_path):
    hq = synthetic.reference_paragraphs()
    rng = np.random.default_rng(0)
    crawl = [synthetic.crawl_junk(rng) for _ in range(len(hq))]
    idx = np.random.default_rng(1).permutation(len(hq))
    test_idx, train_idx = idx[:60], idx[60:]
    cfg = ClassifierConfig(n_features=1 << 16, epochs=8)
    m = classifier.train([hq[i] for i in train_idx], [crawl[i] for i in train_idx], cfg)
    s_hq, s_cr = m.score([hq[i] for i in test_idx]), m.score([crawl[i] for i in test_idx])
    acc = (np.sum(s_hq >= 0.5) + np.sum(s_cr < 0.5)) / 120
    assert acc >= 0.95, acc
    path = tmp_path / "m.npz"
    m.save(path)
    m2 = classifier.QualityModel.load(path)
    np.testing.assert_allclose(m2.score([hq[0]]), m.score([hq[0]]), rtol=1e-6)
    # Same data, same seed: the same model.
    again = classifier.train([hq[i] for i in train_idx], [crawl[i] for i in train_idx], cfg)
    np.testing.assert_array_equal(again.w, m.w)
    # The stage keeps a document iff its score is >= the threshold.
    from jaxllm.curate.io import Record
    from jaxllm.curate.report import Stats
    from jaxllm.curate.stages import Curator
    doc = hq[int(test_idx[0])]
    score = float(m.score([doc])[0])
    for thr, kept in ((score - 1e-6, True), (score + 1e-6, False)):
        c = config.CurateConfig(url=config.UrlConfig(enabled=False),
                                language=config.LanguageConfig(enabled=False),
                                gopher_repetition=config.GopherRepetitionConfig(enabled=False),
                                gopher_quality=config.GopherQualityConfig(enabled=False),
                                c4=config.C4Config(enabled=False), fineweb=config.FineWebConfig(enabled=False),
                                classifier=ClassifierConfig(model_path=str(path), threshold=thr))
        assert (Curator(c).process(Record(0, "x", doc), Stats()) is not None) == kept


def cli_run(argv):
    from jaxllm.curate import cli
    p = argparse.ArgumentParser(prog="jaxllm")
    cli.register(p.add_subparsers())
    a = p.parse_args(argv)
    return a.func(a)


def test_cli_trains_classifier_then_curates_with_it(tmp_path, capsys):
    hq = synthetic.reference_paragraphs()[:150]
    rng = np.random.default_rng(0)
    write_jsonl(tmp_path / "hq.jsonl", [{"text": t} for t in hq])
    write_jsonl(tmp_path / "crawl.jsonl", [{"text": synthetic.crawl_junk(rng)} for _ in range(150)])
    model = tmp_path / "q.npz"
    assert cli_run(["curate", "train-classifier", "--hq", str(tmp_path / "hq.jsonl"), "--crawl",
                    str(tmp_path / "crawl.jsonl"), "--out", str(model), "classifier.epochs=5",
                    "classifier.n_features=65536"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out and model.exists()
    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "in.jsonl", [{"text": t} for t in hq[:20]] +
                [{"text": synthetic.crawl_junk(rng)} for _ in range(20)])
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"input:\n  paths: ['{raw}/*.jsonl']\noutput:\n  dir: {tmp_path / 'out'}\n"
                        f"classifier:\n  model_path: {model}\n"
                        "gopher_quality:\n  enabled: false\nc4:\n  enabled: false\n"
                        "fineweb:\n  enabled: false\ngopher_repetition:\n  enabled: false\n"
                        "language:\n  enabled: false\n")
    assert cli_run(["curate", str(cfg_path), "report.histograms=false"]) == 0
    printed = capsys.readouterr().out
    assert "classifier" in printed
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    st = {s["stage"]: s for s in rep["stages"]}["classifier"]
    assert st["in"] == 40 and st["removed"].get("low_score", 0) >= 18 and st["kept"] >= 18


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_run(["curate", str(REPO / "configs/curate/fineweb.yaml"),
                 f"input.paths=[{tmp_path}/none*.jsonl]", f"output.dir={tmp_path / 'out'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxllm curate: error: ") and "matched no files" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(configlib.ConfigError, match="did you mean 'dedup.num_bands'"):
        config.load(None, ["dedup.num_band=3"])
    with pytest.raises(configlib.ConfigError, match="must be one of"):
        config.load(None, ["runner.kind=spark"])
    with pytest.raises(configlib.ConfigError, match="processes must be >= 1"):
        config.load(None, ["runner.processes=0"])
    cfg = config.load(REPO / "configs/curate/fineweb.yaml")
    assert (cfg.dedup.num_bands, cfg.dedup.rows_per_band, cfg.language.threshold) == (14, 8, 0.65)
    with pytest.raises(ValueError, match="matched no files"):
        io.list_shards(dataclasses.replace(cfg.input, paths=(str(tmp_path / "none*.jsonl"),)))
    assert io.output_name(2, 10, OutputConfig()) == "part-00002-of-00010.jsonl"
