"""HF tokenizers (tokenizer.json + tokenizer_config.json) behind the same interface as ours:
dispatch, special ids from the config, chat template, offsets, pickling, the text pipeline,
and a clear line when the `hf` extra is missing."""
import json
import pathlib
import pickle
import shutil
import sys

import pytest

from jaxllm.data import pipeline, synthetic
from jaxllm.data.config import DataConfig
from jaxllm.data.hf_tokenizer import HFTokenizer, MissingExtra
from jaxllm.data.tokenizer import Tokenizer, check_vocab, load_tokenizer, train_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures" / "chat"))
import make_tokenizer  # noqa: E402

pytest.importorskip("tokenizers")
TEXT = "Once upon a time, Ada found 12 shiny keys. Héllo ✓ 日本語 🙂\nnew line"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return {style: make_tokenizer.build(d / style, style) for style in make_tokenizer.STYLES}


def test_a_dir_with_tokenizer_json_loads_through_tokenizers_with_the_configs_ids(dirs):
    llama = load_tokenizer(dirs["llama3"])
    assert isinstance(llama, HFTokenizer)
    ids = llama.special_ids
    assert (llama.bos_id, llama.eos_id) == (ids["<|begin_of_text|>"], ids["<|eot_id|>"])
    assert llama.unk_id is None and llama.pad_id == llama.eos_id   # no pad, no unk: eos pads
    assert llama.im_start_id is None and llama.mask_id is None
    assert llama.chat_template.startswith("{% set loop_messages")
    qwen = load_tokenizer(dirs["qwen2"] / "tokenizer.json")    # the file itself works too
    assert qwen.bos_id is None and qwen.eos_id == qwen.im_end_id == qwen.special_ids["<|im_end|>"]
    assert qwen.pad_id == qwen.special_ids["<|endoftext|>"] and qwen.im_start_id == qwen.special_ids["<|im_start|>"]
    assert qwen.vocab_size == 700
    check_vocab(qwen, 768)
    with pytest.raises(ValueError, match="model vocab_size 512 is smaller"):
        check_vocab(qwen, 512)


def test_encode_decode_bos_eos_and_offsets(dirs):
    tok = load_tokenizer(dirs["llama3"])
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and tok.bos_id not in ids
    assert tok.encode(TEXT, add_bos=True, add_eos=True) == [tok.bos_id] + ids + [tok.eos_id]
    assert [tok.id_to_piece(i) for i in tok.encode("<|eot_id|>")] == ["<|eot_id|>"]
    assert tok.encode_batch([TEXT, "a"]) == [ids, tok.encode("a")]
    text = "Ada has 3 cats.<|eot_id|> Ben has 2."
    ids, starts = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and starts == sorted(starts)
    # each token decodes to the text from its offset to the next token's
    bounds = starts + [len(text)]
    assert [tok.decode([i]) for i in ids] == [text[a:b] for a, b in zip(bounds, bounds[1:])]
    qwen = load_tokenizer(dirs["qwen2"])
    with pytest.raises(ValueError, match="defines no bos token.*set data.add_bos=false"):
        qwen.encode("hi", add_bos=True)


def test_hf_tokenizer_pickles_for_grain_workers(dirs):
    tok = load_tokenizer(dirs["qwen2"])
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(TEXT) == tok.encode(TEXT) and again.chat_template == tok.chat_template
    assert (again.eos_id, again.pad_id, again.special_ids) == (tok.eos_id, tok.pad_id, tok.special_ids)


def test_chat_template_comes_from_the_jinja_file_or_the_default_of_a_list(dirs, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(dirs["qwen2"], d)
    (d / "chat_template.jinja").write_text("{{ messages }}")
    assert load_tokenizer(d).chat_template == "{{ messages }}"
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).chat_template == "D"
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lists templates \['tool_use'\] but none is named 'default'"):
        load_tokenizer(d)
    cfg["eos_token"] = "<|nope|>"
    cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"eos_token='<\|nope\|>', which is not in the vocabulary"):
        load_tokenizer(d)


def test_dispatch_prefers_tokenizer_json_and_keeps_sentencepiece(dirs, tmp_path):
    sp = train_tokenizer(synthetic.pretrain_docs(300, seed=1), tmp_path / "sp", 360)
    assert isinstance(load_tokenizer(tmp_path / "sp"), Tokenizer) and sp.chat_template is None
    both = tmp_path / "both"
    shutil.copytree(dirs["llama3"], both)
    shutil.copy(tmp_path / "sp" / "tokenizer.model", both / "tokenizer.model")
    assert isinstance(load_tokenizer(both), HFTokenizer)          # as transformers reads it
    assert isinstance(load_tokenizer(both / "tokenizer.model"), Tokenizer)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "broken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    # a SentencePiece model whose tokenizer_config.json (read for its chat template) is broken
    (tmp_path / "sp" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: malformed JSON"):
        load_tokenizer(tmp_path / "sp")


def test_missing_tokenizers_package_is_one_line_naming_the_extra(dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(MissingExtra) as e:
        load_tokenizer(dirs["llama3"])
    assert str(e.value) == (f"the HF tokenizer {dirs['llama3'] / 'tokenizer.json'} needs the 'tokenizers' "
                            f"package, which is not installed: pip install 'jaxllm[hf]'")


def test_text_pipeline_runs_on_an_hf_tokenizer(dirs, tmp_path):
    synthetic.write_jsonl(str(tmp_path / "d.jsonl"), synthetic.pretrain_docs(60, seed=2))
    cfg = DataConfig(kind="text", sources=[str(tmp_path / "d.jsonl")], tokenizer=str(dirs["llama3"]),
                     eval_sources=[str(tmp_path / "d.jsonl")])
    tok = pipeline.load_tokenizer_for(cfg, 768)
    it = pipeline.make_eval_iterator(cfg, seq_len=64, global_batch_size=4, process_index=0,
                                     process_count=1, tokenizer=tok)
    segments = [b["tokens"][r][b["segment_ids"][r] == s] for b in it for r in range(4)
                for s in range(1, b["segment_ids"][r].max() + 1)]
    assert it.stats["documents"] == 60
    assert sum(s[0] == tok.bos_id for s in segments) == sum(s[-1] == tok.eos_id for s in segments) == 60
    assert tok.decode(segments[0][1:]).startswith(next(synthetic.pretrain_docs(1, seed=2))[:20])
    qwen_cfg = DataConfig(kind="text", sources=[str(tmp_path / "d.jsonl")], tokenizer=str(dirs["qwen2"]))
    with pytest.raises(ValueError, match="data.add_bos=true but the tokenizer .* defines no bos token"):
        pipeline.load_tokenizer_for(qwen_cfg)
