"""The grain pipeline end to end: schema, determinism, resume, process/worker invariance,
mixtures, eval coverage, bad input through grain, and the global batch on a mesh."""
import collections
import dataclasses
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.data import packing, pipeline, synthetic
from jaxllm.data.config import DataConfig
from jaxllm.data.sources import DataError, open_source
from jaxllm.data.tokenizer import load_tokenizer

T, B = 128, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    paths = synthetic.prepare_default_data(str(d), train_docs=1200, eval_docs=60, vocab_size=400,
                                           tasks=False)
    cfg = DataConfig(kind="text", sources=[{"path": paths["train"]}], eval_sources=[paths["eval"]],
                     tokenizer=paths["tokenizer"])
    return cfg, load_tokenizer(paths["tokenizer"]), d


def _take(cfg, tok, n, *, p=0, nproc=1, seed=0, state=None, B=B, T=T):
    it = pipeline.make_train_iterator(cfg, seq_len=T, global_batch_size=B, seed=seed, process_index=p,
                                      process_count=nproc, tokenizer=tok)
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(n)]
    st = it.get_state()
    it.close()
    return out, st


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
                                    for x, y in zip(a, b))


def test_batches_follow_the_schema(data):
    cfg, tok, _ = data
    (batch,), _ = _take(cfg, tok, 1)
    assert sorted(batch) == ["loss_mask", "positions", "segment_ids", "tokens"]
    for v in batch.values():
        assert v.shape == (B, T) and v.dtype == np.int32
    assert batch["tokens"].max() < tok.vocab_size


def test_same_seed_same_batches_other_seed_other_batches(data):
    cfg, tok, _ = data
    a, _ = _take(cfg, tok, 5)
    b, _ = _take(cfg, tok, 5)
    c, _ = _take(cfg, tok, 5, seed=1)
    assert _same(a, b) and not _same(a, c)


def test_resume_from_state_continues_exactly(data):
    cfg, tok, _ = data
    full, _ = _take(cfg, tok, 12)
    _, state = _take(cfg, tok, 7)
    state = json.loads(json.dumps(state))  # the state is plain JSON
    rest, _ = _take(cfg, tok, 5, state=state)
    assert _same(rest, full[7:])


def test_resume_through_orbax_with_grain_checkpoint_handlers(data, tmp_path):
    cfg, tok, _ = data
    full, _ = _take(cfg, tok, 9)
    it = pipeline.make_train_iterator(cfg, seq_len=T, global_batch_size=B, seed=0, process_index=0,
                                      process_count=1, tokenizer=tok)
    for _ in range(4):
        next(it)
    stats_at_save = dict(it.stats)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    it.close()
    it2 = pipeline.make_train_iterator(cfg, seq_len=T, global_batch_size=B, seed=0, process_index=0,
                                       process_count=1, tokenizer=tok)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it2)))
    assert it2.stats == stats_at_save
    assert _same([next(it2) for _ in range(5)], full[4:])
    it2.close()


@pytest.mark.parametrize("nproc", [2, 4])
def test_global_batches_do_not_depend_on_process_count(data, nproc):
    cfg, tok, _ = data
    one, _ = _take(cfg, tok, 4)
    parts = [_take(cfg, tok, 4, p=p, nproc=nproc)[0] for p in range(nproc)]
    for k in range(4):
        assert parts[0][k]["tokens"].shape == (B // nproc, T)
        merged = {key: np.concatenate([parts[p][k][key] for p in range(nproc)]) for key in one[k]}
        assert _same([merged], [one[k]])


def test_worker_processes_do_not_change_the_batches(data):
    cfg, tok, _ = data
    ref, _ = _take(cfg, tok, 6)
    with_workers, state = _take(dataclasses.replace(cfg, num_workers=2), tok, 4)
    assert _same(with_workers, ref[:4])
    rest, _ = _take(dataclasses.replace(cfg, num_workers=2), tok, 2, state=state)
    assert _same(rest, ref[4:])


def test_each_epoch_covers_every_document_in_a_new_order(data):
    cfg, _, _ = data
    sources = [(c, open_source(c)) for c in cfg.sources]
    n = len(sources[0][1])
    docs = pipeline._doc_stream(sources, cfg, [7], shuffle=True, repeat=True)
    e1 = [docs[i].where for i in range(n)]
    e2 = [docs[i].where for i in range(n, 2 * n)]
    assert sorted(e1) == sorted(e2) and len(set(e1)) == n and e1 != e2


def test_mixture_follows_the_weights(tmp_path, data):
    _, tok, _ = data
    synthetic.write_jsonl(str(tmp_path / "a.jsonl"), [f"alpha document {i}." for i in range(50)])
    synthetic.write_jsonl(str(tmp_path / "b.jsonl"), [f"beta document {i}." for i in range(50)])
    cfg = DataConfig(kind="text", sources=[{"path": str(tmp_path / "a.jsonl"), "weight": 3},
                                           {"path": str(tmp_path / "b.jsonl"), "weight": 1}])
    counts = collections.Counter()
    for b in _take(cfg, tok, 10, B=8)[0]:
        for row_t, row_s in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, row_s.max() + 1):
                counts[tok.decode(row_t[row_s == s]).split()[0]] += 1
    share = counts["alpha"] / (counts["alpha"] + counts["beta"])
    assert 0.65 < share < 0.85, counts


def test_eval_covers_each_held_out_document_once_for_any_process_count(data):
    cfg, tok, _ = data
    n_eval = len(open_source(cfg.eval_sources[0]))

    def run(p, nproc):
        it = pipeline.make_eval_iterator(cfg, seq_len=T, global_batch_size=B, process_index=p,
                                         process_count=nproc, tokenizer=tok)
        out = list(it)
        return out, it.stats

    one, stats = run(0, 1)
    assert stats["documents"] == n_eval
    assert _same(one, run(0, 1)[0])  # deterministic
    halves = [run(p, 2)[0] for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(one)
    merged = [{k: np.concatenate([halves[0][i][k], halves[1][i][k]]) for k in one[i]} for i in range(len(one))]
    assert _same(merged, one)
    # The tail is padded with rows that are all masked.
    last = one[-1]
    empty = last["segment_ids"].sum(axis=1) == 0
    assert (last["loss_mask"][empty] == 0).all()


def test_eval_with_no_batch_count_reads_the_set_once_and_counts_only_once(data, monkeypatch):
    cfg, tok, _ = data
    cfg = dataclasses.replace(cfg, eval_batches=0, seed=12345)  # a key no other test has cached
    n_eval = len(open_source(cfg.eval_sources[0]))
    calls = []
    real_count = pipeline._count
    monkeypatch.setattr(pipeline, "_count", lambda ds: calls.append(1) or real_count(ds))
    runs = []
    for _ in range(3):
        it = pipeline.make_eval_iterator(cfg, seq_len=T, global_batch_size=B, process_index=0,
                                         process_count=1, tokenizer=tok, num_batches=None)
        runs.append(list(it))
        assert it.stats["documents"] == n_eval
        with pytest.raises(StopIteration):
            next(it)
    assert len(calls) == cfg.shard_count(B)  # counted on the first call only
    assert all(_same(r, runs[0]) for r in runs)
    assert runs[0][-1]["segment_ids"].sum() < runs[0][0]["segment_ids"].sum() or len(runs[0]) == 1


def test_unpaired_surrogate_stops_with_file_and_line_or_is_skipped(tmp_path, data):
    _, tok, _ = data
    lines = [json.dumps({"text": f"good document {i}."}) for i in range(10)]
    lines[4] = '{"text": "bad \\ud800 document"}'
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(kind="text", sources=[str(tmp_path / "s.jsonl")], shuffle=False,
                     eval_sources=[str(tmp_path / "s.jsonl")])
    with pytest.raises(DataError, match=r"s.jsonl:5: text is not valid UTF-8 \(unpaired surrogate\)"):
        list(pipeline.make_eval_iterator(cfg, seq_len=T, global_batch_size=2, process_index=0,
                                         process_count=1, tokenizer=tok))
    it = pipeline.make_eval_iterator(dataclasses.replace(cfg, skip_bad_records=True), seq_len=T,
                                     global_batch_size=2, process_index=0, process_count=1, tokenizer=tok)
    list(it)
    assert (it.stats["documents"], it.stats["skipped_records"]) == (9, 1)


def test_bad_record_in_a_file_stops_with_file_and_line(tmp_path, data):
    _, tok, _ = data
    lines = [json.dumps({"text": f"good document {i}."}) for i in range(30)]
    lines[11] = '{"text": "oops'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(kind="text", sources=[str(tmp_path / "bad.jsonl")], shuffle=False)
    with pytest.raises(DataError, match=r"bad.jsonl:12: malformed JSON"):
        _take(cfg, tok, 20, B=2)
    # With skip_bad_records the record is skipped and counted: one pass over the file (the
    # eval iterator) sees 29 documents and 1 skipped record.
    skipping = dataclasses.replace(cfg, skip_bad_records=True, eval_sources=cfg.sources)
    it = pipeline.make_eval_iterator(skipping, seq_len=T, global_batch_size=2, process_index=0,
                                     process_count=1, tokenizer=tok)
    list(it)
    assert (it.stats["documents"], it.stats["skipped_records"]) == (29, 1)
    train, _ = _take(skipping, tok, 3, B=2)
    assert train[0]["tokens"].shape == (2, T)


def test_impossible_layouts_are_explained(data):
    cfg, tok, _ = data
    with pytest.raises(ValueError, match="must divide the global batch size 8"):
        _take(dataclasses.replace(cfg, num_shards=3), tok, 1)
    with pytest.raises(ValueError, match="3 processes cannot split 8 logical data shards"):
        _take(cfg, tok, 1, nproc=3)
    with pytest.raises(ValueError, match="num_workers=3 must divide the 8 data shards"):
        _take(dataclasses.replace(cfg, num_workers=3), tok, 1)
    with pytest.raises(ValueError, match="data.kind=text"):
        _take(DataConfig(), tok, 1)


def test_vocab_check_at_startup(data):
    cfg, tok, _ = data
    pipeline.load_tokenizer_for(cfg, 512)
    with pytest.raises(ValueError, match="model vocab_size 256 is smaller"):
        pipeline.load_tokenizer_for(cfg, 256)


def test_to_global_batch_shards_rows_over_the_mesh(data):
    cfg, tok, _ = data
    (local,), _ = _take(cfg, tok, 1)
    devices = jax.devices()
    mesh = jax.make_mesh((2, len(devices) // 2), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
    out = pipeline.to_global_batch(local, mesh)
    for k, v in out.items():
        assert v.shape == (B, T) and v.sharding.spec == P(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(v), local[k])
    assert packing.STATS_KEY not in out


def test_parquet_text_and_array_record_sources_mix_in_one_pipeline(tmp_path, data):
    _, tok, _ = data
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ar = pytest.importorskip("array_record.python.array_record_module")
    pq.write_table(pa.table({"body": [f"parquet document {i}." for i in range(20)]}), tmp_path / "p.parquet")
    (tmp_path / "t.txt").write_text("".join(f"text document {i}.\n" for i in range(20)))
    w = ar.ArrayRecordWriter(str(tmp_path / "r.array_record"), "group_size:1")
    for i in range(20):
        w.write(f"arrayrecord document {i}.".encode())
    w.close()
    cfg = DataConfig(kind="text", sources=[
        {"path": str(tmp_path / "p.parquet"), "text_field": "body"},
        {"path": str(tmp_path / "t.txt"), "text_unit": "line"},
        {"path": str(tmp_path / "r.array_record")}])
    firsts = collections.Counter()
    for b in _take(cfg, tok, 3, B=4)[0]:
        for row_t, row_s in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, row_s.max() + 1):
                firsts[tok.decode(row_t[row_s == s]).split()[0]] += 1
    assert set(firsts) == {"parquet", "text", "arrayrecord"}


def test_data_config_survives_the_run_dir_yaml_round_trip(data, tmp_path):
    from jaxllm import configlib
    cfg = dataclasses.replace(data[0], packing="best_fit", num_workers=2)
    configlib.dump_yaml(cfg, tmp_path / "d.yaml")
    assert configlib.load(DataConfig, tmp_path / "d.yaml") == cfg


def test_default_shard_count_is_fixed_up_to_64_processes_and_valid_past_them():
    cfg = DataConfig()
    # any process count dividing 64 gets the same shards (so the same global batches)
    assert {pipeline._layout(cfg, 512, p)[0] for p in (1, 2, 4, 8, 16, 32, 64)} == {64}
    assert pipeline._layout(cfg, 512, 128) == (128, 4, 1)     # past 64 processes
    assert pipeline._layout(cfg, 256, 256) == (256, 1, 1)
    assert pipeline._layout(cfg, 24, 3) == (24, 1, 8)         # a count that does not divide 64
    with pytest.raises(ValueError, match="cannot split"):
        pipeline._layout(cfg, 64, 128)                        # fewer rows than processes
    assert pipeline._layout(dataclasses.replace(cfg, num_shards=8), 512, 4) == (8, 64, 2)
