"""Data iterator states across a change of process count (data/layout.py, pipeline.remap_state):
the states n processes saved, remapped onto m processes, continue the global batch sequence
exactly; what cannot be remapped is refused in one line."""
import dataclasses
import json

import numpy as np
import pytest

from jaxllm.data import layout, pipeline, synthetic
from jaxllm.data.config import DataConfig
from jaxllm.data.sources import DataError
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.data.tokens import synthetic_batches

T, B, K = 64, 8, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    paths = synthetic.prepare_default_data(str(d), train_docs=600, eval_docs=20, vocab_size=400, tasks=False)
    cfg = DataConfig(kind="text", sources=[{"path": paths["train"]}], tokenizer=paths["tokenizer"], num_shards=4)
    return cfg, load_tokenizer(paths["tokenizer"])


def _global(cfg, tok, n, k, states=None, remap=True):
    """Global batches (tokens) from n processes, k steps, after restoring `states` (every old
    process's saved state) with remap_state; -> (batches, the n states saved after them)."""
    its = [pipeline.make_train_iterator(cfg, seq_len=T, global_batch_size=B, seed=0, process_index=p,
                                        process_count=n, tokenizer=tok) for p in range(n)]
    for p, it in enumerate(its):
        if states is not None:
            it.set_state(it.remap_state(states) if remap else states[p])
    out = [np.concatenate([next(it)["tokens"] for it in its]) for _ in range(k)]
    saved = [json.loads(json.dumps(it.get_state())) for it in its]   # as the checkpoint holds them
    for it in its:
        it.close()
    return out, saved


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 4), (4, 1)])
def test_remapped_states_continue_the_global_batch_sequence(data, old, new):
    cfg, tok = data
    ref, ref_states = _global(cfg, tok, 1, 2 * K)
    first, saved = _global(cfg, tok, old, K)
    second, after = _global(cfg, tok, new, K, saved)
    for i, (got, want) in enumerate(zip(first + second, ref)):
        np.testing.assert_array_equal(got, want, err_msg=f"global batch {i}")
    # the running counts: process 0 carries the old totals, so the sum over processes is right
    for key in ("documents", "tokens", "padding_tokens", "split_pieces"):
        assert sum(s["stats"][key] for s in after) == ref_states[0]["stats"][key], key
    assert all(s["stats"]["batches"] == 2 * K for s in after)
    assert [s["layout"]["process"] for s in after] == list(range(new))


def test_without_the_remap_the_shards_would_be_wrong(data):
    """The control: process 0's saved state given as it is to a 1-process run (its shards 0-1
    in the place of shards 0-3) does not continue the sequence, so the test above can fail."""
    cfg, tok = data
    ref, _ = _global(cfg, tok, 1, 2 * K)
    _, saved = _global(cfg, tok, 2, K)
    it = pipeline.make_train_iterator(cfg, seq_len=T, global_batch_size=B, seed=0, process_index=0,
                                      process_count=1, tokenizer=tok)
    with pytest.raises(DataError, match="does not fit this iterator"):
        it.set_state(saved[0])   # set_state refuses another process's layout outright
    fresh = next(it)["tokens"]   # and a data restart would repeat batch 0, not batch K
    it.close()
    assert not np.array_equal(fresh, ref[K])


def test_a_worker_count_change_regroups_the_same_shards(data, capsys):
    """data.num_workers 2 -> 0 (same process count): set_state regroups the per-worker states,
    and says so."""
    cfg, tok = data
    ref, _ = _global(cfg, tok, 1, 2 * K)
    first, saved = _global(dataclasses.replace(cfg, num_workers=2), tok, 1, K)
    capsys.readouterr()
    second, _ = _global(cfg, tok, 1, K, saved, remap=False)
    assert "saved with data.num_workers=2 is regrouped onto data.num_workers=0" in capsys.readouterr().err
    for got, want in zip(first + second, ref):
        np.testing.assert_array_equal(got, want)


def test_a_changed_shard_count_is_refused_naming_the_setting(data):
    cfg, tok = data
    _, saved = _global(cfg, tok, 2, 1)
    it = pipeline.make_train_iterator(dataclasses.replace(cfg, num_shards=8), seq_len=T, global_batch_size=B,
                                      seed=0, process_index=0, process_count=1, tokenizer=tok)
    with pytest.raises(DataError, match="4 logical shards and this run 8: set data.num_shards=4"):
        it.remap_state(saved)
    old = [{k: v for k, v in s.items() if k != "layout"} for s in saved]   # an older checkpoint
    with pytest.raises(DataError, match="predates process-count changes"):
        it.remap_state(old)
    it.close()


def test_global_index_iterators_take_the_state_every_process_holds():
    its = [synthetic_batches(seq_len=16, global_batch_size=4, vocab_size=64, seed=0, process_index=p,
                             process_count=2) for p in range(2)]
    for it in its:
        next(it), next(it)
    states = [it.get_state() for it in its]
    one = synthetic_batches(seq_len=16, global_batch_size=4, vocab_size=64, seed=0)
    one.set_state(one.remap_state(states))
    ref = synthetic_batches(seq_len=16, global_batch_size=4, vocab_size=64, seed=0)
    next(ref), next(ref)
    np.testing.assert_array_equal(next(one)["tokens"], next(ref)["tokens"])
    with pytest.raises(DataError, match="process 0 and process 1 differ"):
        layout.same_on_every_process([{"next_index": 2}, {"next_index": 3}])
