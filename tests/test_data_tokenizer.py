"""Tokenizer: training options, determinism, loading ours and HF-style dirs, vocab checks, CLI."""
import io
import json
import pickle

import pytest
import sentencepiece as spm

from jaxllm.cli import main as cli_main
from jaxllm.data import synthetic
from jaxllm.data.tokenizer import CHAT_TOKENS, check_vocab, load_tokenizer, train_tokenizer

DOCS = list(synthetic.pretrain_docs(1500, seed=3))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(DOCS, d, 400)
    return d


def test_training_is_deterministic_to_the_byte(tmp_path, tok_dir):
    train_tokenizer(DOCS, tmp_path / "again", 400)
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()


def test_reserved_ids_and_chat_tokens_are_single_pieces(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.special_ids == {"<|im_start|>": 4, "<|im_end|>": 5, "<mask>": 6}
    assert tok.mask_id == 6 and tok.encode("a <mask> b").count(6) == 1
    assert (tok.im_start_id, tok.im_end_id) == (4, 5)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids.count(4) == 1 and ids.count(5) == 1
    for piece in CHAT_TOKENS:
        assert tok.id_to_piece(tok.special_ids[piece]) == piece


def test_byte_fallback_round_trips_any_text_without_unk(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "Héllo ✓ 日本語 \t tabs\nnew line  double  spaces 🙂"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_digits_are_split_one_per_piece(tok_dir):
    tok = load_tokenizer(tok_dir)
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
    assert [p for p in pieces if p != "▁"] == ["1", "2", "3", "4", "5"]


def test_bos_eos_are_added_on_request(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode("a cat", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id


def test_tokenizer_pickles_for_grain_workers(tok_dir):
    tok = load_tokenizer(tok_dir / "tokenizer.model")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("Once upon a time") == tok.encode("Once upon a time")
    assert clone.vocab_size == tok.vocab_size == 400


def test_vocab_too_large_for_corpus_names_the_maximum(tmp_path):
    with pytest.raises(ValueError, match=r"Vocabulary size too high \(5000\).*<= \d+"):
        train_tokenizer(DOCS[:200], tmp_path, 5000)


def test_vocab_below_byte_fallback_minimum_is_refused(tmp_path):
    with pytest.raises(ValueError, match="byte fallback alone needs 256 pieces plus 7 special ones; "
                                         "use at least 263"):
        train_tokenizer(DOCS, tmp_path, 262)


def test_unpaired_surrogate_in_training_text_names_its_location(tmp_path, capsys):
    from jaxllm.data.sources import DataError
    with pytest.raises(DataError, match=r"training text 3: text is not valid UTF-8 \(unpaired surrogate\)"):
        train_tokenizer(DOCS[:2] + ["bad \ud800 text"] + DOCS[2:300], tmp_path / "t", 400)
    (tmp_path / "c.jsonl").write_text("".join('{"text": %s}\n' % json.dumps(d) for d in DOCS[:300])
                                      + '{"text": "x \\ud800"}\n')
    with pytest.raises(SystemExit) as e:
        cli_main(["tokenizer", "train", "--input", str(tmp_path / "c.jsonl"), "--vocab-size", "400",
                  "--out", str(tmp_path / "tok")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "c.jsonl:301: text is not valid UTF-8 (unpaired surrogate)" in err and "Traceback" not in err


def test_check_vocab_fails_at_startup_when_model_is_smaller(tok_dir):
    tok = load_tokenizer(tok_dir)
    check_vocab(tok, 400)
    check_vocab(tok, 512)
    with pytest.raises(ValueError, match="model vocab_size 399 is smaller than the tokenizer's vocabulary"):
        check_vocab(tok, 399)


def test_loads_hf_llama_style_checkpoint_dir(tmp_path):
    # Llama's convention: unk=0, bos=1, eos=2 and no pad piece; the dir also holds config.json.
    w = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS[:300]), model_writer=w, vocab_size=360,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(w.getvalue())
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.im_start_id is None and tok.special_ids == {}
    assert tok.decode(tok.encode("The capital of Zorbia")) == "The capital of Zorbia"


def test_missing_tokenizer_errors_are_clear(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json in this directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


def test_cli_trains_on_jsonl_files_and_encodes(tmp_path, capsys):
    synthetic.write_jsonl(str(tmp_path / "a.jsonl"), DOCS[:800])
    synthetic.write_jsonl(str(tmp_path / "b.jsonl"), DOCS[800:])
    assert cli_main(["tokenizer", "train", "--input", str(tmp_path / "*.jsonl"), "--vocab-size", "400",
                     "--out", str(tmp_path / "tok")]) == 0
    # Same documents (read back from the files, in order) -> the same model as in memory.
    train_tokenizer(DOCS, tmp_path / "mem", 400)
    assert (tmp_path / "tok/tokenizer.model").read_bytes() == (tmp_path / "mem/tokenizer.model").read_bytes()
    capsys.readouterr()
    assert cli_main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "7 + 5 = 12."]) == 0
    assert '"1", "2"' in capsys.readouterr().out


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(SystemExit) as e:
        cli_main(["tokenizer", "train", "--input", str(tmp_path / "bad.jsonl"), "--vocab-size", "300",
                  "--out", str(tmp_path / "tok")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.jsonl'}:2: malformed JSON" in err and "Traceback" not in err
