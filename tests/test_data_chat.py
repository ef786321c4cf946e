"""Chat data: the loss mask covers exactly the answers (ChatML and two Jinja templates), the
gradient of the masked loss agrees, templates that cannot be split are refused, bad and long
records are counted, packed rows keep each example, resume and process count do not change
the batches, and the embedded synthetic chat data goes through whole."""
import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.data import chat, packing, pipeline, synthetic
from jaxllm.data.config import DataConfig
from jaxllm.data.sources import DataError
from jaxllm.data.tokenizer import load_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures" / "chat"))
import make_tokenizer  # noqa: E402
from test_data_pipeline import _same  # noqa: E402
from test_data_pipeline import _take as _take_any

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

T, B = 96, 4
STYLES = ("chatml", "llama3", "qwen2")
HEADER = {"chatml": "<|im_start|>assistant\n", "qwen2": "<|im_start|>assistant\n",
          "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
EOT = {"chatml": "<|im_end|>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}
CONVO = [{"role": "system", "content": "You answer in one short sentence."},
         {"role": "user", "content": "What is the capital of Kalomi?"},
         {"role": "assistant", "content": "The capital of Kalomi is Ravo."},
         {"role": "user", "content": "And what is 3 + 4?"},
         {"role": "assistant", "content": "3 + 4 = 7."}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The embedded corpus with its chat files, and our SentencePiece tokenizer trained on it."""
    d = tmp_path_factory.mktemp("synth")
    paths = synthetic.prepare_default_data(str(d), train_docs=800, eval_docs=40, vocab_size=400)
    return d, load_tokenizer(paths["tokenizer"])


@pytest.fixture(scope="module")
def toks(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    out = {"chatml": corpus[1]}
    for style in ("llama3", "qwen2"):
        out[style] = load_tokenizer(make_tokenizer.build(d / style, style))
    return out


def _runs(mask):
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


@pytest.mark.parametrize("style", STYLES)
def test_mask_is_exactly_each_answer_and_its_end_of_turn(toks, style):
    tok = toks[style]
    ids, mask = chat.render_chat(CONVO, tok)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    answers = [m["content"] for m in CONVO if m["role"] == "assistant"]
    runs = _runs(np.asarray(mask))
    assert len(runs) == len(answers)
    for (a, b), answer in zip(runs, answers):
        # the target run is the answer and its end-of-turn token, nothing more or less ...
        assert tok.decode(ids[a:b]) == answer + EOT[style]
        assert ids[b - 1] == tok.special_ids[EOT[style]]
        # ... and it follows the assistant header, which is not a target
        assert tok.decode(ids[:a]).endswith(HEADER[style])
    prompt_side = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in CONVO:
        if m["role"] != "assistant":
            assert m["content"] in prompt_side
    assert not any(a in prompt_side for a in answers)


def _masked_loss_grad(ids, mask):
    from jaxllm.objectives.clm import masked_cross_entropy, target_weights
    n = len(ids)
    batch = {"tokens": jnp.asarray([ids], jnp.int32), "loss_mask": jnp.asarray([mask], jnp.int32),
             "segment_ids": jnp.ones((1, n), jnp.int32)}
    logits = jax.random.normal(jax.random.key(0), (1, n, max(ids) + 1))

    def loss(logits_btv):
        return masked_cross_entropy(logits_btv[:, :-1], batch["tokens"][:, 1:], target_weights(batch))[0]
    return np.abs(np.asarray(jax.grad(loss)(logits))[0]).sum(-1)   # (n,): per predicting position


@pytest.mark.parametrize("style", STYLES)
def test_gradient_of_the_masked_loss_flows_only_from_answers(toks, style):
    ids, mask = chat.render_chat(CONVO, toks[style])
    g = _masked_loss_grad(ids, mask)
    # the logits at position t-1 predict token t: their gradient is the target's
    target_grad = g[:-1]
    target_mask = np.asarray(mask[1:])
    assert (target_grad[target_mask == 0] == 0).all()       # system, user, headers: exactly zero
    assert (target_grad[target_mask == 1] > 0).all()        # every answer and end-of-turn token
    assert g[-1] == 0                                       # the last position predicts nothing


@pytest.mark.parametrize("style", STYLES)
def test_generation_prompt_is_the_training_prefix_up_to_each_answer(toks, style):
    tok = toks[style]
    ids, mask = chat.render_chat(CONVO, tok)
    for k, m in enumerate(CONVO):
        if m["role"] == "assistant":
            prompt = chat.chat_prompt(CONVO[:k], tok)
            assert ids[:len(prompt)] == prompt
            assert mask[len(prompt)] == 1 and not any(mask[:len(prompt)][-3:])
            assert tok.decode(prompt).endswith(HEADER[style])


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_jinja_rendering_tokenizes_like_the_whole_text(toks, style):
    # transformers tokenizes the rendered conversation whole; so do we
    tok = toks[style]
    template = chat.resolve_template(tok)
    assert template.source == tok.chat_template and "tokenizer_config" not in template.name
    text = template.render(CONVO, False, tok)
    assert chat.render_chat(CONVO, tok)[0] == tok.encode(text)
    assert chat.chat_prompt(CONVO[:2], tok) == tok.encode(template.render(CONVO[:2], True, tok))


def test_templates_get_strftime_now_and_the_special_tokens_the_tokenizer_defines(toks):
    # transformers passes strftime_now (Llama-3.x's "Today Date") and the set special tokens only
    import datetime
    template = chat.ChatTemplate('{{ strftime_now("%Y") }}|{{ pad_token }}|{{ unk_token }}|{{ bos_token }}', "t")
    sp, qwen2, llama3 = toks["chatml"], toks["qwen2"], toks["llama3"]
    want = {"chatml": f"{sp.id_to_piece(sp.pad_id)}|{sp.id_to_piece(sp.unk_id)}|{sp.id_to_piece(sp.bos_id)}",
            "qwen2": "<|endoftext|>||",                     # a pad_token, no unk, no bos
            "llama3": f"||{llama3.id_to_piece(llama3.bos_id)}"}   # no pad_token: not its eos fallback
    assert sp.id_to_piece(sp.pad_id) == "<pad>" and qwen2.unk_id is None and llama3.pad_id == llama3.eos_id
    for style, rest in want.items():
        before = datetime.datetime.now().year
        got = template.render(CONVO, False, toks[style])
        assert got in {f"{y}|{rest}" for y in (before, datetime.datetime.now().year)}, (style, got)


def test_qwen2_default_system_prompt_is_prompt_side(toks):
    tok = toks["qwen2"]
    ids, mask = chat.render_chat(CONVO[1:3], tok)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are Qwen")
    (a, b), = _runs(np.asarray(mask))
    assert tok.decode(ids[a:b]) == CONVO[2]["content"] + "<|im_end|>"


def _template_file(tmp_path, name, source):
    p = tmp_path / name
    p.write_text(source)
    return str(p)


def test_templates_that_reorder_or_merge_turns_are_refused_by_name(toks, tmp_path):
    tok = toks["qwen2"]
    reverse = ("{% for m in messages | reverse %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    merge = ("<|im_start|>user\n{% for m in messages if m.role != 'assistant' %}{{ m.content }} {% endfor %}"
             "<|im_end|>\n{% for m in messages if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    no_end = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    for name, source, why in (("reverse.jinja", reverse, "cannot be split into turns"),
                              ("merge.jinja", merge, "cannot be split into turns"),
                              ("no_end.jinja", no_end, "no special end-of-turn token")):
        template = chat.load_template(_template_file(tmp_path, name, source), tok)
        with pytest.raises(chat.ChatTemplateError, match=rf"chat template \S*{name}.*{why}"):
            chat.render_chat(CONVO, tok, template)
    with pytest.raises(chat.ChatTemplateError, match=r"bad.jinja: Jinja syntax error at line 1"):
        chat.load_template(_template_file(tmp_path, "bad.jinja", "{% for m in messages %}"), tok)


def test_chatml_needs_the_chat_pieces(toks, tmp_path):
    tok = toks["llama3"]
    with pytest.raises(chat.ChatTemplateError, match="no <|im_start|>/<|im_end|> tokens"):
        chat.render_chat(CONVO, tok, "chatml")


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


GOOD = {"messages": CONVO[1:3]}
BAD = ['{"messages": [{"role": "user", "content": "no answer"}]}',
       '{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
       '{"messages": [{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "y"}]}',
       '{"messages": [{"role": "user"',
       '{"text": "not a chat record"}']
WHY = ["no assistant turn", "unknown role 'tool'", r"content must be a string, got list", "malformed JSON",
       "needs 'messages' or 'prompt' and 'completion'"]


def _chat_cfg(path, tok_path, **kw):
    return DataConfig(kind="chat", sources=[path], eval_sources=[path], tokenizer=tok_path, shuffle=False, **kw)


def _eval_pass(cfg, tok, B=B, seq_len=T):
    it = pipeline.make_eval_iterator(cfg, seq_len=seq_len, global_batch_size=B, process_index=0,
                                     process_count=1, tokenizer=tok)
    rows = [r for b in it for r in (dict(zip(b, v)) for v in zip(*b.values()))]
    return rows, it.stats, it.scan


def test_bad_records_are_skipped_counted_and_located_or_refused_when_strict(toks, tmp_path, capfd):
    tok = toks["chatml"]
    records = [GOOD] * 3 + BAD + [{"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2."}]
    path = _write(tmp_path / "mixed.jsonl", records)
    rows, stats, scan = _eval_pass(_chat_cfg(path, tok.path), tok)
    assert (scan["records"], scan["examples"], scan["bad"]) == (9, 4, 5)
    assert (stats["documents"], stats["skipped_records"]) == (4, 5)
    line = capfd.readouterr().err
    assert "chat eval data: 9 records" in line and "5 bad records skipped" in line
    for k, why in enumerate(WHY):
        assert f"mixed.jsonl:{4 + k}: " in line  # the first five, with file:line ...
        assert re.search(why, line)  # ... and what is wrong
    with pytest.raises(DataError, match=r"mixed.jsonl:4: no assistant turn.*data.strict=true"):
        pipeline.make_train_iterator(_chat_cfg(path, tok.path, strict=True), seq_len=T, global_batch_size=B,
                                     seed=0, process_index=0, process_count=1, tokenizer=tok)


def test_data_with_no_usable_example_is_an_error(toks, tmp_path):
    tok = toks["chatml"]
    path = _write(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(DataError, match=r"no usable chat examples.*5 bad records \(first: .*bad.jsonl:1"):
        pipeline.make_train_iterator(_chat_cfg(path, tok.path), seq_len=T, global_batch_size=B, seed=0,
                                     process_index=0, process_count=1, tokenizer=tok)
    path = _write(tmp_path / "long.jsonl", [GOOD] * 2)
    with pytest.raises(DataError, match=r"no usable chat examples.*2 dropped as longer than 16 tokens"):
        pipeline.make_train_iterator(_chat_cfg(path, tok.path, long_examples="drop"), seq_len=16,
                                     global_batch_size=B, seed=0, process_index=0, process_count=1, tokenizer=tok)


def _long_convo(turns):
    msgs = [CONVO[0]]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"},
                 {"role": "assistant", "content": f"The answer to question {i} is {2 * i}."}]
    return msgs


@pytest.mark.parametrize("style", STYLES)
def test_truncation_drops_early_turns_and_keeps_the_last_answer(toks, style):
    tok = toks[style]
    template = chat.resolve_template(tok)
    msgs = _long_convo(12)
    r = chat.render(msgs, tok, template)
    # A row that holds the system prompt and the last two exchanges, but not three.
    last_two = chat.render([msgs[0]] + msgs[-4:], tok, template)
    seq_len = len(last_two.ids) + 3
    assert len(r.ids) > seq_len and len(chat.render([msgs[0]] + msgs[-6:], tok, template).ids) > seq_len
    ids, mask, note = chat.fit(r, seq_len, "truncate")
    assert note == packing.TRUNCATED
    # exactly the conversation without its earliest turns, rendered, with its own mask
    assert ids.tolist() == last_two.ids.tolist() and mask.tolist() == last_two.mask.tolist()
    runs = _runs(mask)
    assert tok.decode(ids[runs[-1][0]:runs[-1][1]]) == msgs[-1]["content"] + EOT[style]
    assert chat.fit(r, seq_len, "drop")[2] == packing.DROPPED
    # A prompt too long to keep whole is cut from the left (after the system prompt), the
    # answer kept whole; an answer longer than a row is dropped.
    one = [CONVO[0], {"role": "user", "content": "Tell me. " * 60}, CONVO[2]]
    ids, mask, note = chat.fit(chat.render(one, tok, template), T, "truncate")
    assert note == packing.TRUNCATED and len(ids) == T
    text = tok.decode(ids)
    end = CONVO[2]["content"] + EOT[style] + ("" if style == "llama3" else "\n")
    assert CONVO[0]["content"] in text and text.endswith(end)
    assert tok.decode(ids[_runs(mask)[-1][0]:]).startswith(CONVO[2]["content"])
    huge = [CONVO[1], {"role": "assistant", "content": "Ravo. " * 80}]
    assert chat.fit(chat.render(huge, tok, template), T, "truncate")[2] == packing.DROPPED


def test_long_examples_are_counted_in_the_scan_and_the_stats(toks, tmp_path):
    tok = toks["chatml"]
    path = _write(tmp_path / "l.jsonl", [GOOD, {"messages": _long_convo(12)}, GOOD,
                                         {"messages": _long_convo(14)}])
    for mode, want in (("truncate", (4, 2, 0)), ("drop", (2, 0, 2))):
        rows, stats, scan = _eval_pass(_chat_cfg(path, tok.path, long_examples=mode), tok)
        assert (scan["examples"], scan["truncated"], scan["dropped"]) == want
        assert (stats["documents"], stats["truncated_examples"], stats["dropped_examples"]) == want
        assert all(int((r["segment_ids"] > 0).sum()) <= T for r in rows)


def _segments(row):
    return [(tuple(row["tokens"][row["segment_ids"] == s]), tuple(row["loss_mask"][row["segment_ids"] == s]))
            for s in range(1, row["segment_ids"].max() + 1)]


@pytest.mark.parametrize("style", ["chatml", "qwen2"])
def test_packed_rows_keep_each_examples_segment_and_mask(corpus, toks, style):
    d, _ = corpus
    tok = toks[style]
    path = str(d / "chat" / "eval.jsonl")
    rows, stats, scan = _eval_pass(_chat_cfg(path, tok.path), tok, seq_len=256)
    assert scan["truncated"] == 0
    expected = sorted((tuple(ids), tuple(mask)) for ids, mask in
                      (chat.render_chat(json.loads(line)["messages"], tok) for line in open(path)))
    got = sorted(s for r in rows for s in _segments(r))
    assert got == expected                                # every example once, whole, its own mask
    for r in rows:
        seg, mask = r["segment_ids"], r["loss_mask"]
        starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
        assert (mask[starts] == 0).all()                  # no target predicted across examples
        assert (mask[seg == 0] == 0).all()
        assert sum(len(s[0]) for s in _segments(r)) <= 256  # an example is never split
    assert stats["documents"] == scan["examples"] == len(expected)


def _take(cfg, tok, n, **kw):
    return _take_any(cfg, tok, n, B=B, T=T, **kw)


def test_chat_resume_is_exact_and_process_count_does_not_change_the_batches(corpus, toks):
    d, _ = corpus
    tok = toks["llama3"]
    cfg = DataConfig(kind="chat", sources=[str(d / "chat" / "train.jsonl")], tokenizer=tok.path)
    full, _ = _take(cfg, tok, 10)
    _, state = _take(cfg, tok, 6)
    rest, _ = _take(cfg, tok, 4, state=json.loads(json.dumps(state)))
    assert _same(rest, full[6:])
    assert full[0]["loss_mask"].sum() > 0
    parts = [_take(cfg, tok, 4, p=p, nproc=2)[0] for p in range(2)]
    for k in range(4):
        merged = {key: np.concatenate([parts[0][k][key], parts[1][k][key]]) for key in full[k]}
        assert _same([merged], [full[k]])


def test_worker_processes_render_the_same_batches(corpus, toks):
    # grain workers get pickled copies of the HF tokenizer and the Jinja template
    d, _ = corpus
    tok = toks["qwen2"]
    cfg = DataConfig(kind="chat", sources=[str(d / "chat" / "train.jsonl")], tokenizer=tok.path)
    ref, _ = _take(cfg, tok, 3)
    assert _same(_take(dataclasses.replace(cfg, num_workers=2), tok, 3)[0], ref)


def test_synthetic_chat_data_goes_through_without_skips(corpus, capfd):
    d, tok = corpus
    cfg = DataConfig(kind="chat", sources=[str(d / "chat" / "train.jsonl")],
                     eval_sources=[str(d / "chat" / "eval.jsonl")], tokenizer=tok.path)
    it = pipeline.make_train_iterator(cfg, seq_len=256, global_batch_size=B, seed=0, process_index=0,
                                      process_count=1, tokenizer=tok)
    batches = [next(it) for _ in range(5)]
    n_train = sum(1 for _ in open(d / "chat" / "train.jsonl"))
    assert it.scan["records"] == it.scan["examples"] == n_train
    assert it.scan["bad"] == it.scan["dropped"] == it.scan["truncated"] == 0
    assert it.stats["skipped_records"] == 0 and it.stats["documents"] > 0
    assert all(b["loss_mask"].sum() > 0 for b in batches)
    it.close()
    assert f"chat train data: {n_train} records in 1 source -> {n_train} examples" in capfd.readouterr().err
    rows, stats, scan = _eval_pass(cfg, tok, seq_len=256)
    assert stats["documents"] == scan["records"] and stats["skipped_records"] == 0


def test_prompt_completion_records_and_parquet_sources(toks, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tok = toks["chatml"]
    pq.write_table(pa.table({"messages": [CONVO[1:3], CONVO[1:5]]}), tmp_path / "c.parquet")
    _write(tmp_path / "pc.jsonl", [{"prompt": CONVO[1]["content"], "completion": CONVO[2]["content"]}])
    cfg = DataConfig(kind="chat", sources=[str(tmp_path / "pc.jsonl")], tokenizer=tok.path, shuffle=False,
                     eval_sources=[str(tmp_path / "pc.jsonl"), str(tmp_path / "c.parquet")])
    rows, stats, scan = _eval_pass(cfg, tok, seq_len=256)
    got = sorted(s for r in rows for s in _segments(r))
    want = sorted(tuple(map(tuple, chat.render_chat(m, tok))) for m in (CONVO[1:3], CONVO[1:3], CONVO[1:5]))
    assert stats["skipped_records"] == 0, scan
    assert got == want


def test_chat_config_is_checked(toks, tmp_path):
    with pytest.raises(ValueError, match="data.chat_template applies to data.kind=chat"):
        DataConfig(kind="text", sources=["x"], chat_template="chatml")
    with pytest.raises(ValueError, match="data.long_examples applies to data.kind=chat, not text"):
        DataConfig(kind="text", sources=["x"], long_examples="drop")
    with pytest.raises(ValueError, match="data.add_eos applies to data.kind=text, not chat.*templates decide"):
        DataConfig(kind="chat", sources=["x"], add_eos=False)
    with pytest.raises(ValueError, match="data.max_doc_chars applies to data.kind=text, not chat"):
        DataConfig(kind="chat", sources=["x"], max_doc_chars=0)
    with pytest.raises(ValueError, match="data.kind=chat needs at least one entry"):
        DataConfig(kind="chat")
    with pytest.raises(ValueError, match="contradict"):
        DataConfig(kind="chat", sources=["x"], strict=True, skip_bad_records=True)
    path = _write(tmp_path / "g.jsonl", [GOOD])
    cfg = DataConfig(kind="chat", sources=[{"path": path, "text_field": "body"}], tokenizer=toks["chatml"].path)
    with pytest.raises(ValueError, match="text_field/text_unit do not apply to chat records"):
        _take(cfg, toks["chatml"], 1)


def test_tokenizers_and_jinja2_stay_optional(toks, tmp_path):
    # Without the `hf` extra: importing and ChatML over our tokenizer work; an HF tokenizer or a
    # Jinja template says in one line which extra to install.
    script = f"""
import sys
sys.modules["tokenizers"] = None
sys.modules["jinja2"] = None
import jaxllm, jaxllm.data.pipeline
from jaxllm.data import chat
from jaxllm.data.tokenizer import load_tokenizer
tok = load_tokenizer({toks["chatml"].path!r})
ids, mask = chat.render_chat({CONVO!r}, tok)
assert sum(mask) > 0
for f in (lambda: load_tokenizer({str(pathlib.Path(toks["qwen2"].path).parent)!r}),
          lambda: chat.render_chat({CONVO!r}, tok, "{{{{ messages }}}}")):
    try:
        f()
    except Exception as e:
        print(type(e).__name__, str(e))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("MissingExtra") and "'tokenizers'" in lines[0]
    assert lines[1].startswith("MissingExtra") and "'jinja2'" in lines[1]
    assert all(line.endswith("pip install 'jaxllm[hf]'") for line in lines)
