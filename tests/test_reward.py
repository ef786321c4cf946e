"""Reward models: the ranking loss by hand, where the reward is read, transformers' scores on the
same weights, the ranking data (layout, resume, bad records), sharding, and learning end to end."""
import importlib.util
import json
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.data import preference
from jaxllm.data.config import DataConfig
from jaxllm.data.sources import DataError
from jaxllm.interop.hf import load_hf, save_hf
from jaxllm.model.heads import last_token_index
from jaxllm.objectives.reward import make_reward_loss, ranking_sums, score
from jaxllm.training.reward import init_reward_params

FIX = pathlib.Path(__file__).parent / "fixtures" / "reward"
CFG = jaxllm.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def mean_loss(r, mask, **kw):
    loss, sums = ranking_sums(jnp.asarray(r, jnp.float32), jnp.asarray(mask), **kw)
    return float(loss) / float(sums["weight"]), {k: float(v) for k, v in sums.items()}


# ---------------------------------------------------------------------------- the loss by hand
def test_two_responses_give_the_bradley_terry_loss():
    loss, sums = mean_loss([[1.3, -0.4]], [[1, 1]])
    np.testing.assert_allclose(loss, -math.log(1 / (1 + math.exp(-1.7))), rtol=1e-6)
    assert sums["weight"] == 1 and sums["accuracy"] == 1
    np.testing.assert_allclose(sums["margin"], 1.7, rtol=1e-6)
    loss, sums = mean_loss([[-0.4, 1.3]], [[1, 1]])          # ranked the wrong way round
    np.testing.assert_allclose(loss, math.log(1 + math.exp(1.7)), rtol=1e-6)
    assert sums["accuracy"] == 0


def test_equal_rewards_give_log_2_and_half_accuracy():
    loss, sums = mean_loss([[0.7, 0.7, 0.7]], [[1, 1, 1]])
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert sums["weight"] == 3 and sums["accuracy"] == 1.5 and sums["margin"] == 0


def test_four_responses_average_their_six_pairs():
    r = np.random.RandomState(0).standard_normal((2, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])            # 6 + 3 pairs
    pairs = [(b, i, j) for b in range(2) for i in range(4) for j in range(i + 1, 4) if mask[b, j]]
    assert len(pairs) == 9
    by_hand = np.mean([math.log(1 + math.exp(-(r[b, i] - r[b, j]))) for b, i, j in pairs])
    loss, sums = mean_loss(r, mask)
    np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
    assert sums["weight"] == 9
    assert sums["accuracy"] == sum(r[b, i] > r[b, j] for b, i, j in pairs)
    np.testing.assert_allclose(sums["margin"], sum(r[b, i] - r[b, j] for b, i, j in pairs), rtol=1e-5)


def test_padding_k_changes_nothing_in_the_sums():
    r = np.random.RandomState(1).standard_normal((3, 3)).astype(np.float32)
    padded = np.concatenate([r, np.array([[1e3, -50.0]] * 3, np.float32)], axis=1)
    a = mean_loss(r, np.ones((3, 3)), margin=0.2, center_coef=0.1)
    b = mean_loss(padded, np.array([[1, 1, 1, 0, 0]] * 3), margin=0.2, center_coef=0.1)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=1e-6, err_msg=k)


def test_margin_and_centering_by_hand():
    r = [2.0, 0.5, -1.0]
    loss, sums = mean_loss([r], [[1, 1, 1]], margin=0.5, center_coef=0.1)
    d = [r[0] - r[1], r[0] - r[2], r[1] - r[2]]
    ranking = np.mean([math.log(1 + math.exp(-(x - 0.5))) for x in d])
    center = 0.1 * np.mean(np.square(r))                    # mean r^2 over the 3 responses
    np.testing.assert_allclose(loss, ranking + center, rtol=1e-6)
    np.testing.assert_allclose(sums["center"] / 3, center, rtol=1e-6)
    np.testing.assert_allclose(sums["ranking"] / 3, ranking, rtol=1e-6)
    assert sums["accuracy"] == 3                             # accuracy ignores the margin


# ---------------------------------------------------------------------------- the model's reward
def random_reward_params(cfg, seed=0):
    params = init_reward_params(cfg, jax.random.key(seed))
    params["reward_head"]["kernel"] = jax.random.normal(jax.random.key(seed + 1), (cfg.d_model,))
    return params


def right_padded(lengths, t, seed=0, pad=0):
    tokens = np.array(jax.random.randint(jax.random.key(seed), (len(lengths), t), 2, CFG.vocab_size))
    seg = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(seg == 1, tokens, pad).astype(np.int32), seg


def test_reward_is_read_at_the_last_real_token():
    params = random_reward_params(CFG)
    lengths = [12, 7, 3]
    tokens, seg = right_padded(lengths, 12)
    np.testing.assert_array_equal(np.asarray(last_token_index(jnp.asarray(seg))), [11, 6, 2])
    score_fn = jax.jit(lambda p, t, s: score(p, t, s, CFG))
    r = np.asarray(score_fn(params, tokens, seg))
    chex.assert_shape(r, (3,))
    hidden, _ = jax.jit(lambda p, t, s: jaxllm.trunk(p, t, CFG, segment_ids=s))(params, tokens, seg)
    at = np.asarray(hidden @ params["reward_head"]["kernel"])          # (3, 12): every position
    rows = np.arange(3)
    np.testing.assert_allclose(r, at[rows, np.asarray(lengths) - 1], rtol=1e-5, atol=1e-6)
    # neither the first pad nor the last column would give these values
    assert np.abs(r[1:] - at[rows[1:], np.asarray(lengths[1:])]).min() > 1e-2
    assert np.abs(r[1:] - at[rows[1:], -1]).min() > 1e-2
    # and what sits in the padding cannot change a reward
    other, _ = right_padded(lengths, 12, seed=5, pad=9)
    other = np.where(seg == 1, tokens, other)
    np.testing.assert_allclose(np.asarray(score_fn(params, other, seg)), r, rtol=1e-6)


def block_batch(k_real, k_max, t, seed=0):
    """(1, k_max, T) right-padded responses; rows past k_real hold junk tokens and are masked."""
    lengths = [t - 2 * i for i in range(k_max)]
    tokens, seg = right_padded(lengths, t, seed=seed)
    seg[k_real:] = 0                                   # K padding: junk tokens, no real token
    pos = np.where(seg == 1, np.arange(t)[None], 0)
    return {"tokens": tokens[None], "positions": pos[None].astype(np.int32), "segment_ids": seg[None],
            "response_mask": (np.arange(k_max) < k_real).astype(np.int32)[None]}


def test_padding_k_up_to_k_max_changes_nothing_in_the_model_loss_or_its_gradient():
    params = random_reward_params(CFG)
    loss_fn = make_reward_loss(CFG, margin=0.3, center_coef=0.05)
    small = block_batch(3, 3, 16)
    big = block_batch(3, 5, 16)
    big["tokens"][:, :3] = small["tokens"][0]          # same three real responses
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (la, sa), ga = grad_fn(params, small, None)
    (lb, sb), gb = grad_fn(params, big, None)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    assert float(sa["weight"]) == float(sb["weight"]) == 3
    # (reduction order differs with the row count: fp32 noise ~2e-6 on gradients ~1e-1)
    chex.assert_trees_all_close(ga, gb, rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("case", ["llama_seqcls", "qwen2_seqcls"])
def test_scores_match_transformers_sequence_classification(case):
    cfg, params = load_hf(FIX / case)
    assert "reward_head" in params and "lm_head" not in params
    assert cfg.qkv_bias == (case == "qwen2_seqcls")
    ref = np.load(FIX / case / "reference.npz")
    assert json.loads((FIX / case / "config.json").read_text())["pad_token_id"] == 0
    # transformers found each row's last token that is not the pad id; we read segment_ids
    r = score(params, ref["input_ids"], ref["attention_mask"], cfg)
    np.testing.assert_allclose(np.asarray(r), ref["scores"], atol=1e-4, rtol=1e-4)
    hidden, _ = jaxllm.trunk(params, ref["input_ids"], cfg, segment_ids=ref["attention_mask"])
    at = np.asarray(hidden @ params["reward_head"]["kernel"])
    real = ref["attention_mask"] == 1
    np.testing.assert_allclose(at[real], ref["all_scores"][real], atol=1e-4, rtol=1e-4)


def _export_helper():
    spec = importlib.util.spec_from_file_location("reward_jaxllm_export", FIX / "jaxllm_export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tensors(path):
    from safetensors.numpy import load_file
    return load_file(str(path / "model.safetensors"))


def test_jaxllm_export_is_what_transformers_scored(tmp_path):
    mod = _export_helper()
    cfg, params = mod.model_config(), mod.make_params()
    save_hf(tmp_path, cfg, params, head="reward", pad_token_id=mod.PAD, eos_token_id=mod.EOS)
    committed = FIX / "jaxllm_export"
    # the same files transformers loaded when the fixture was made ...
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((committed / "config.json").read_text())
    ours, theirs = _tensors(tmp_path), _tensors(committed)
    assert set(ours) == set(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    # ... and jaxllm's scores are transformers' reading of them
    ref = np.load(committed / "reference.npz")
    np.testing.assert_allclose(np.asarray(score(params, ref["input_ids"], ref["attention_mask"], cfg)),
                               ref["scores"], atol=1e-4, rtol=1e-4)
    cfg2, params2 = load_hf(tmp_path)                    # and it loads back exactly
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)


@pytest.mark.parametrize("case", ["llama_seqcls", "qwen2_seqcls"])
def test_export_has_transformers_tensor_names_and_shapes(tmp_path, case):
    cfg, params = load_hf(FIX / case)
    hf_cfg = json.loads((FIX / case / "config.json").read_text())
    save_hf(tmp_path, cfg, params, head="reward", pad_token_id=0, eos_token_id=2)
    ours, theirs = _tensors(tmp_path), _tensors(FIX / case)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours["score.weight"].shape == (1, cfg.d_model) and "lm_head.weight" not in ours
    out = json.loads((tmp_path / "config.json").read_text())
    assert out["architectures"] == hf_cfg["architectures"]
    assert len(out["id2label"]) == 1 and out["pad_token_id"] == 0 and out["eos_token_id"] == 2
    chex.assert_trees_all_equal(load_hf(tmp_path)[1], params)


def test_reward_export_refuses_what_transformers_would_misread(tmp_path):
    params = random_reward_params(CFG)
    with pytest.raises(ValueError, match="needs pad_token_id"):
        save_hf(tmp_path, CFG, params, head="reward")
    with pytest.raises(ValueError, match="equals eos_token_id"):
        save_hf(tmp_path, CFG, params, head="reward", pad_token_id=3, eos_token_id=3)
    with pytest.raises(ValueError, match="pass head='reward'"):
        save_hf(tmp_path, CFG, params)
    with pytest.raises(ValueError, match="no 'reward_head'"):
        save_hf(tmp_path, CFG, jaxllm.init_params(CFG, jax.random.key(0)), head="reward", pad_token_id=0)
    bad = json.loads((FIX / "llama_seqcls" / "config.json").read_text())
    bad["id2label"] = {"0": "a", "1": "b"}
    from jaxllm.interop.hf import CheckpointFormatError, config_from_hf
    with pytest.raises(CheckpointFormatError, match="2 labels; a reward model has num_labels=1"):
        config_from_hf(bad)


# ---------------------------------------------------------------------------- ranking data
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The embedded corpus (reward splits included) and a tokenizer trained on it."""
    from jaxllm.data import synthetic
    d = tmp_path_factory.mktemp("synth")
    paths = synthetic.prepare_default_data(str(d), train_docs=2400, eval_docs=400, vocab_size=400)
    return {"dir": d, "tokenizer": paths["tokenizer"], "train": str(d / "reward" / "train.jsonl"),
            "eval": str(d / "reward" / "eval.jsonl")}


def data_cfg(synth, sources=None, **kw):
    return DataConfig(kind="chat", tokenizer=synth["tokenizer"], sources=sources or [synth["train"]],
                      eval_sources=[synth["eval"]], **kw)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_batches_have_the_schema_and_rows_end_at_the_end_of_turn(synth):
    from jaxllm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(synth["tokenizer"])
    it = preference.make_train_iterator(data_cfg(synth), seq_len=192, global_batch_size=8, seed=0, k_max=5)
    b = next(it)
    for key in ("tokens", "positions", "segment_ids"):
        chex.assert_shape(b[key], (8, 5, 192))
    chex.assert_shape(b["response_mask"], (8, 5))
    assert b["response_mask"][:, :4].all() and not b["response_mask"][:, 4].any()   # synth K=4
    seg, n = b["segment_ids"], b["segment_ids"].sum(-1)
    assert set(np.unique(seg)) <= {0, 1}
    t = np.arange(192)
    np.testing.assert_array_equal(seg, (t < n[..., None]).astype(np.int32))        # right padding
    np.testing.assert_array_equal(b["positions"], np.where(seg == 1, t, 0))
    np.testing.assert_array_equal(b["tokens"][seg == 0], tok.pad_id)
    real = b["response_mask"] == 1
    last = np.take_along_axis(b["tokens"], (n - 1)[..., None], -1)[..., 0]
    assert (last[real] == tok.im_end_id).all() and tok.pad_id != tok.im_end_id


def test_global_batches_do_not_depend_on_the_process_count_and_resume_exactly(synth):
    cfg = data_cfg(synth, num_shards=4)
    kw = dict(seq_len=96, global_batch_size=8, seed=3, k_max=4)
    one = preference.make_train_iterator(cfg, **kw)
    halves = [preference.make_train_iterator(cfg, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(3):
        whole = next(one)
        parts = [next(h) for h in halves]
        for key in preference.BATCH_KEYS:
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    state = one.get_state()
    expected = next(one)
    again = preference.make_train_iterator(cfg, **kw)
    again.set_state(state)
    got = next(again)
    for key in preference.BATCH_KEYS:
        np.testing.assert_array_equal(got[key], expected[key])
    # another seed, another order
    other = next(preference.make_train_iterator(cfg, **dict(kw, seed=4)))
    assert not np.array_equal(other["tokens"], preference.make_train_iterator(cfg, **kw).__next__()["tokens"])


def test_eval_reads_every_ranking_once_in_shard_layout_then_pads(synth):
    from jaxllm.data import chat
    from jaxllm.data.sources import Record
    from jaxllm.data.tokenizer import load_tokenizer
    records = [json.loads(line) for line in open(synth["eval"])]
    cfg = data_cfg(synth, num_shards=4)                     # S=4 shards, R=2 rows each per batch
    batches = list(preference.make_eval_iterator(cfg, seq_len=192, global_batch_size=8, k_max=4))
    assert len(batches) == math.ceil(len(records) / 8)
    tok = load_tokenizer(synth["tokenizer"])
    enc = preference.RankingEncode(tok, chat.load_template("", tok), 192, 4)
    seen = []
    for k, b in enumerate(batches):
        for s in range(4):
            for r in range(2):
                j = s + 4 * (k * 2 + r)                     # record j of shard s, row k*R + r
                row = {key: v[s * 2 + r] for key, v in b.items()}
                if j < len(records):
                    want = enc(Record(records[j], f"eval:{j}"))
                    for key in preference.BATCH_KEYS:
                        np.testing.assert_array_equal(row[key], want[key], err_msg=f"{key} of record {j}")
                    seen.append(j)
                else:                                       # padding: adds no pair
                    assert not row["response_mask"].any() and not row["segment_ids"].any()
    assert sorted(seen) == list(range(len(records)))


def test_chosen_rejected_pairs_and_long_prompts_are_cut_on_the_prompt_side(synth, tmp_path):
    from jaxllm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(synth["tokenizer"])
    long_prompt = "What is the capital of Mifinor? " * 20
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 7."},
        {"prompt": long_prompt, "chosen": "The capital is Raranor.", "rejected": "I do not know."},
        {"prompt": "Hi?", "responses": ["Hello there, friend. " * 30, "Hi.", "No."]},   # too long alone
    ])
    cfg = DataConfig(kind="chat", tokenizer=synth["tokenizer"], sources=[path], eval_sources=[path])
    it = preference.make_eval_iterator(cfg, seq_len=64, global_batch_size=3, k_max=3)
    b = next(it)
    c = it.scan
    assert (c["rankings"], c["pairs"], c["truncated"], c["dropped_responses"]) == (3, 3, 2, 1)
    n = b["segment_ids"].sum(-1)
    np.testing.assert_array_equal(b["response_mask"], [[1, 1, 0], [1, 1, 0], [1, 1, 0]])
    text = [[tok.sp.decode(b["tokens"][i, k, :n[i, k]].tolist()) for k in range(2)] for i in range(3)]
    assert text[0][0].endswith("2 + 3 = 5.<|im_end|>") and text[0][1].endswith("2 + 3 = 7.<|im_end|>")
    assert n[1, 0] == 64 and text[1][0].endswith("The capital is Raranor.<|im_end|>")
    assert text[1][0].count("Mifinor") < 20                     # the prompt was cut, from the left
    assert text[2][0].endswith("Hi.<|im_end|>") and text[2][1].endswith("No.<|im_end|>")   # order kept


BAD = [
    ({"prompt": "Q?", "responses": ["only one"]}, "a ranking needs at least 2 responses, got 1"),
    ({"prompt": "Q?", "responses": ["A.", "  "]}, "response 1 is empty"),
    ({"prompt": "What is 2 + 2?", "responses": ["4.", " What is 2 + 2? "]}, "response 1 only repeats the prompt"),
    ({"prompt": "Q?", "responses": ["A.", 7]}, "response 1 must be a string, got int"),
    ({"prompt": ["Q?"], "responses": ["A.", "B."]}, "'prompt' must be a string, got list"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": None}, "'rejected' must be a string, got NoneType"),
    ({"prompt": "Q?", "responses": ["A.", "A."]}, "responses 0 and 1 are the same text"),
    ({"prompt": "Q?", "responses": ["A", "B", "C", "D", "E"]}, "5 responses, more than reward.k_max=4"),
    ({"prompt": "Q?", "responses": ["A.", "B.", "C."], "scores": [1, 1, 1]},
     r"scores 1 and 1 of responses 0 and 1 tie \(a tie ranks nothing\)"),
    ({"prompt": "Q?", "responses": ["Go away.", "Hi there."], "scores": [-1, 1]},
     "scores -1 and 1 of responses 0 and 1 rise: responses go best first"),
    ({"prompt": "Q?", "responses": ["A.", "B."], "scores": [1.0]}, "'scores' must be 2 finite numbers"),
    ({"prompt": "Q?", "responses": ["A.", "B."], "chosen": "B.", "rejected": "A."},
     "the record has both 'responses' and 'chosen'/'rejected'"),
    ({"text": "no ranking here"}, r"a ranking record needs 'prompt' and 'responses' \(best first\), or "
                                   r"'prompt', 'chosen' and 'rejected' \(fields present: \['text'\]\)"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_a_bad_record_is_an_error_naming_file_and_line_under_strict(synth, tmp_path, record, message):
    good = {"prompt": "What is 1 + 1?", "responses": ["1 + 1 = 2.", "1 + 1 = 3."]}
    path = write_jsonl(tmp_path / "r.jsonl", [good, record])
    cfg = DataConfig(kind="chat", tokenizer=synth["tokenizer"], sources=[path], strict=True)
    with pytest.raises(DataError, match=f"r.jsonl:2: {message}.*data.strict=true"):
        preference.make_train_iterator(cfg, seq_len=64, global_batch_size=2, seed=0, k_max=4)


def test_bad_records_are_skipped_and_counted_with_their_location(synth, tmp_path, capsys):
    good = {"prompt": "What is 1 + 1?", "responses": ["1 + 1 = 2.", "1 + 1 = 3."]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, BAD[0][0], "{not json", good, BAD[2][0]])
    cfg = DataConfig(kind="chat", tokenizer=synth["tokenizer"], sources=[path])
    it = preference.make_train_iterator(cfg, seq_len=64, global_batch_size=2, seed=0, k_max=4)
    err = capsys.readouterr().err
    assert "5 records in 1 source -> 2 rankings (2 pairs)" in err and "3 bad records skipped" in err
    # pairs in rows of k_max=4: half of each ranking's rows would be padding, said with the fix
    assert "reward.k_max=4 but no ranking has more than 2 responses: set reward.k_max=2 (2 of 4 rows" in err
    assert "mixed.jsonl:2: a ranking needs at least 2 responses" in err and "mixed.jsonl:3: malformed JSON" in err
    assert "mixed.jsonl:5: response 1 only repeats the prompt" in err
    assert [list(r) for r in it.scan["usable"]] == [[0, 3]]
    for _ in range(3):                                 # only the good rankings come out
        assert next(it)["response_mask"].sum() == 4


def test_no_usable_ranking_is_an_error(synth, tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [BAD[0][0], BAD[1][0]])
    cfg = DataConfig(kind="chat", tokenizer=synth["tokenizer"], sources=[path])
    with pytest.raises(DataError, match=r"no usable rankings in train data .*none.jsonl.*2 records, 2 bad "
                                        r"\(first: .*none.jsonl:1: a ranking needs at least 2"):
        preference.make_train_iterator(cfg, seq_len=64, global_batch_size=2, seed=0, k_max=4)
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Q?", "responses": ["word " * 200, "A."]}])
    cfg = DataConfig(kind="chat", tokenizer=synth["tokenizer"], sources=[too_long])
    with pytest.raises(DataError, match="1 left with fewer than 2 responses that fit seq_len=64"):
        preference.make_train_iterator(cfg, seq_len=64, global_batch_size=2, seed=0, k_max=4)


def test_data_keys_that_do_not_apply_are_refused(synth):
    with pytest.raises(ValueError, match="set data.kind=chat"):
        preference.check_data_config(DataConfig(kind="text", tokenizer="x", sources=["x"]))
    with pytest.raises(ValueError, match="data.packing_bins does not apply to rankings"):
        preference.check_data_config(data_cfg(synth, packing_bins=4))
    with pytest.raises(ValueError, match="data.num_workers=2"):
        preference.check_data_config(data_cfg(synth, num_workers=2))


# ---------------------------------------------------------------------------- the recipe
def recipe_args(synth, run_dir, *extra):
    return ["model=tiny", "train.objective=reward", "train.batch_size=8", "train.seq_len=96",
            "train.log_every=1", "train.progress=false", "optim.warmup_steps=0", "optim.lr=1e-3",
            "data.kind=chat", f"data.tokenizer={synth['tokenizer']}", f"data.sources=[{{path: '{synth['train']}'}}]",
            f"data.eval_sources=[{{path: '{synth['eval']}'}}]", f"train.run_dir={run_dir}", *extra]


@pytest.mark.slow
def test_sharded_reward_steps_match_single_device(synth, tmp_path):
    assert len(jax.devices()) == 8, "conftest must give 8 CPU devices"
    out = {}
    for name, mesh in (("single", ["mesh.devices=1"]),
                       ("sharded", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.preset=fsdp_tp"])):
        s = jaxllm.train(jaxllm.load_config(None, recipe_args(synth, tmp_path / name, "train.steps=3",
                                                              "train.eval_every=0", *mesh)))
        out[name] = ([h["loss"] for h in s["history"]], jax.device_get(s["state"].params), s["state"])
    (l0, p0, _), (l1, p1, state) = out["single"], out["sharded"]
    assert len(l1) == 3 and abs(l0[0] - math.log(2)) < 1e-6     # zero head: every pair is a tie
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert l0[2] < l0[0]
    chex.assert_trees_all_equal_structs(p1, p0)
    # per-tensor relative error (elementwise is ill-posed under Adam; see test_sharding.py)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p0)):
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
        assert rel < 1e-5, (jax.tree_util.keystr(path), rel)
    assert "tensor" in state.params["layers"]["attn"]["q"]["kernel"].sharding.spec
    assert set(state.params) == {"embed", "layers", "final_norm", "reward_head"}   # no LM head


@pytest.mark.slow
def test_reward_learning_starts_from_log_2_and_drops(synth, tmp_path):
    """The short form of the end-to-end test (random init, 40 steps): clear learning."""
    s = jaxllm.train(jaxllm.load_config(None, recipe_args(synth, tmp_path / "short", "train.steps=40",
                                                          "train.eval_every=40", "train.eval_batches=0",
                                                          "mesh.devices=1", "train.log_every=10")))
    first, last = s["history"][0], s["history"][-1]
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["accuracy"] == 0.5   # all ties
    print(f"\nheld-out after 40 steps from a random init: {s['eval']}")
    assert s["eval"]["eval_loss"] < 0.55 and s["eval"]["eval_accuracy"] > 0.7
    assert last["margin"] > 0.5


@pytest.mark.slow
def test_reward_model_from_a_pretrained_run_ranks_held_out_responses(synth, tmp_path, capsys):
    """End to end: pretrain the tiny model on the synthetic corpus (600 steps), train the reward
    model from that run (checkpoint.init_from: trunk loaded, LM head dropped, zero head), reach
    >= 0.9 pairwise accuracy on held-out rankings, export it for transformers and read it back."""
    import time
    t0 = time.perf_counter()
    d = synth["dir"]
    jaxllm.train(jaxllm.load_config(None, [
        "model=tiny", "train.steps=600", "train.batch_size=16", "train.seq_len=128", "train.eval_every=0",
        "train.progress=false", "mesh.devices=1", "optim.lr=3e-3", "optim.warmup_steps=20", "data.kind=text",
        f"data.tokenizer={synth['tokenizer']}", f"data.sources=[{{path: '{d}/pretrain/train-*.jsonl'}}]",
        f"train.run_dir={tmp_path / 'pretrain'}"]))
    t1 = time.perf_counter()
    # 600 steps. At 300 it measured 0.898 once the story rankings' second answer became the good
    # story on a negative feeling (a minimal pair; 2026-12-05); at 400, 0.909 on jax 0.10.2 and
    # 0.880 on jax 0.12.1 (CI, 2026-12-06). 600: 0.918 on jax 0.12.1 (one run; an 800-step
    # schedule measured 0.931 / 0.933 at its step 600 on jax 0.10.2 / 0.12.1).
    s = jaxllm.train(jaxllm.load_config(None, recipe_args(
        synth, tmp_path / "reward", "train.steps=600", "train.seq_len=160", "train.log_every=25",
        "train.eval_every=600", "train.eval_batches=0", "mesh.devices=1", "optim.warmup_steps=10",
        f"checkpoint.init_from={tmp_path / 'pretrain'}")))
    err = capsys.readouterr().err
    assert "initialised params from" in err and "reward head: new, initialised to zeros" in err
    ev = s["eval"]
    with capsys.disabled():
        print(f"\nreward e2e: held-out pairwise accuracy {ev['eval_accuracy']:.3f} over {ev['eval_pairs']:.0f} "
              f"pairs (loss {ev['eval_loss']:.3f}, margin {ev['eval_margin']:.2f}); pretrain "
              f"{t1 - t0:.0f} s, reward {time.perf_counter() - t1:.0f} s")
    assert ev["eval_pairs"] > 500 and ev["eval_accuracy"] >= 0.9
    from jaxllm.training.reward import export_hf
    export_hf(tmp_path / "reward", tmp_path / "hf")
    cfg, params = load_hf(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"] == 0
    chex.assert_trees_all_close(params, jax.device_get(s["state"].params))


def test_init_from_a_language_model_a_reward_run_or_an_exported_reward_model(synth, tmp_path):
    """An LM (HF *ForCausalLM here) gives the trunk and a zero head; a reward run (orbax) and
    its *ForSequenceClassification export give trunk and head."""
    lm = jaxllm.init_params(jaxllm.load_config(None, ["model=tiny"]).model, jax.random.key(7))
    save_hf(tmp_path / "lm", jaxllm.load_config(None, ["model=tiny"]).model, lm)

    def start(name, init_from, steps=0):
        return jaxllm.train(jaxllm.load_config(None, recipe_args(
            synth, tmp_path / name, f"train.steps={steps}", "train.eval_every=0", "mesh.devices=1",
            f"checkpoint.init_from={init_from}")))["state"].params
    p = start("from_lm", tmp_path / "lm")
    assert set(p) == {"embed", "layers", "final_norm", "reward_head"}
    chex.assert_trees_all_equal({k: v for k, v in p.items() if k != "reward_head"},
                                {k: v for k, v in lm.items() if k != "lm_head"})
    assert not np.asarray(p["reward_head"]["kernel"]).any()
    trained = jax.device_get(start("trained", tmp_path / "lm", steps=2))
    assert np.asarray(trained["reward_head"]["kernel"]).any()
    chex.assert_trees_all_equal(jax.device_get(start("from_run", tmp_path / "trained")), trained)
    from jaxllm.training.reward import export_hf
    export_hf(tmp_path / "trained", tmp_path / "exported")
    chex.assert_trees_all_equal(jax.device_get(start("from_export", tmp_path / "exported")), trained)


def test_convert_exports_a_reward_runs_checkpoints_dir_and_names_a_missing_config(synth, tmp_path, capsys):
    from jaxllm.cli import main
    jaxllm.train(jaxllm.load_config(None, recipe_args(synth, tmp_path / "run", "train.steps=1", "train.eval_every=0",
                                                      "mesh.devices=1")))
    capsys.readouterr()
    for src, out in ((tmp_path / "run", "a"), (tmp_path / "run" / "checkpoints", "b")):
        assert main(["convert", str(src), str(tmp_path / out), "--to", "hf"]) == 0, capsys.readouterr().err
    chex.assert_trees_all_equal(load_hf(tmp_path / "a"), load_hf(tmp_path / "b"))
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    # an orbax export of an HF reward model has no run config.yaml (no tokenizer, no pad id)
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "orbax" / "ck"), "--to", "orbax"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "orbax" / "ck"), str(tmp_path / "c"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exporting a reward model needs its run's config.yaml" in err, err
    assert str(tmp_path / "orbax" / "config.yaml") in err


@pytest.mark.slow
def test_a_resumed_reward_run_continues_exactly(synth, tmp_path):
    # optim.decay_steps fixes the lr horizon (a run started with train.steps=2 keeps its own)
    args = ["train.eval_every=0", "mesh.devices=1", "checkpoint.every=2", "checkpoint.async_save=false",
            "optim.decay_steps=10"]
    straight = jaxllm.train(jaxllm.load_config(None, recipe_args(synth, tmp_path / "a", "train.steps=4", *args)))
    jaxllm.train(jaxllm.load_config(None, recipe_args(synth, tmp_path / "b", "train.steps=2", *args)))
    resumed = jaxllm.train(jaxllm.load_config(None, recipe_args(synth, tmp_path / "b", "train.steps=4", *args)))
    assert resumed["resumed_from"] == 2
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"][2:]]
    chex.assert_trees_all_equal(jax.device_get(resumed["state"].params), jax.device_get(straight["state"].params))


def test_train_on_your_own_ranking_batches(tmp_path):
    def batches():
        i = 0
        while True:
            b = [block_batch(3, 4, 32, seed=i * 8 + j) for j in range(8)]
            yield {k: np.concatenate([x[k] for x in b]) for k in b[0]}
            i += 1
    s = jaxllm.train(jaxllm.load_config(None, [
        "model=tiny", "train.objective=reward", "train.steps=2", "train.batch_size=8", "train.seq_len=32",
        "train.eval_every=0", "train.progress=false", "mesh.devices=1", f"train.run_dir={tmp_path}"]), batches())
    assert s["steps"] == 2 and s["history"][0]["weight"] == 8 * 3     # 3 pairs per prompt
