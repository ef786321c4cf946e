"""`jaxllm demo`'s ownership of its directory (fast; the whole demo is in test_demo.py, slow):
a stage deletes or reuses only outputs that the demo recorded writing."""
import json

import pytest

import jaxllm
from jaxllm.demo import pipeline


def test_the_demo_never_deletes_or_reuses_what_it_did_not_write(tmp_path):
    out = tmp_path / "demo"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "notes.txt").write_text("a user's notes")
    with pytest.raises(jaxllm.UserError, match=r"raw exists and was not written by the demo's crawl stage"):
        pipeline.run(str(out), quick=True, only=["synth", "crawl"])
    assert (out / "raw" / "notes.txt").read_text() == "a user's notes"
    # the same with --force, and for a stage that would otherwise count the folder as done
    with pytest.raises(jaxllm.UserError, match=r"raw exists and was not written"):
        pipeline.run(str(out), quick=True, force=True, only=["crawl"])
    assert (out / "raw" / "notes.txt").read_text() == "a user's notes"
    # what the demo wrote it redoes (--force): recorded in stages.json, replaced
    (out / "synth" / "mine.txt").write_text("inside the demo's own output")
    assert pipeline.run(str(out), quick=True, force=True, only=["synth"]) == 0
    assert not (out / "synth" / "mine.txt").exists() and (out / "synth" / "chat" / "train.jsonl").exists()
    assert json.loads((out / "stages.json").read_text())["synth"]["status"] == "done"
