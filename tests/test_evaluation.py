"""Using a model: `jaxllm generate / chat / eval`, held-out perplexity, sample completions and
the lm-evaluation-harness adapter, each checked against direct jaxllm forward passes."""
import dataclasses
import io
import json
import os
import re
import shutil
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # before lm-eval imports `datasets`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.cli import main  # noqa: E402
from jaxllm.config import MeshConfig  # noqa: E402
from jaxllm.data import synthetic  # noqa: E402
from jaxllm.data.chat import chat_prompt  # noqa: E402
from jaxllm.data.tokenizer import load_tokenizer  # noqa: E402
from jaxllm.evaluation.perplexity import file_perplexity  # noqa: E402
from jaxllm.evaluation.samples import sample_completions  # noqa: E402
from jaxllm.model.generate import generate_text  # noqa: E402
from jaxllm.parallel import mesh as mesh_lib  # noqa: E402
from jaxllm.parallel import rules as rules_lib

CFG = jaxllm.ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                         max_seq_len=128, init_std=0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic.prepare_default_data(str(tmp_path_factory.mktemp("synth")), train_docs=300, eval_docs=12,
                                          vocab_size=400, tasks=False)


@pytest.fixture(scope="module")
def tok(data):
    return load_tokenizer(data["tokenizer"])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, data):
    """A random tiny model saved by save_hf, with our SentencePiece tokenizer.model beside it."""
    d = tmp_path_factory.mktemp("hf")
    jaxllm.save_hf(d, CFG, jaxllm.init_params(CFG, jax.random.key(0)))
    shutil.copy(os.path.join(data["tokenizer"], "tokenizer.model"), d / "tokenizer.model")
    return d


def scripted_params(tok, chain: dict[int, int], cfg=CFG):
    """A model that answers deterministically: after token a it emits chain[a]. Attention and
    MLP write nothing (o, down = 0), so the last hidden state is the current token's
    embedding; lm_head column e is the embedding of the token it should follow."""
    params = jaxllm.init_params(dataclasses.replace(cfg, init_std=1.0), jax.random.key(3))
    params["layers"]["attn"]["o"]["kernel"] = jnp.zeros_like(params["layers"]["attn"]["o"]["kernel"])
    params["layers"]["mlp"]["down"]["kernel"] = jnp.zeros_like(params["layers"]["mlp"]["down"]["kernel"])
    emb = params["embed"]["embedding"]
    head = jnp.zeros_like(params["lm_head"]["kernel"])
    for after, emit in chain.items():
        head = head.at[:, emit].set(emb[after])
    params["lm_head"]["kernel"] = head
    return params


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ jaxllm generate
def test_generate_cli_prints_the_greedy_completion_of_an_hf_dir(hf_dir, tok, capsys):
    code, out, err = run_cli(capsys, "generate", hf_dir, "--prompt", "Once upon a time", "--prompt", "The",
                             "--max-new-tokens", 6, "--json")
    assert code == 0, err
    got = json.loads(out)
    cfg, params = jaxllm.load_hf(hf_dir)
    want = generate_text(params, cfg, tok, ["Once upon a time", "The"], max_new_tokens=6, key=jax.random.key(0))
    assert [g["completion"] for g in got] == want and [g["prompt"] for g in got] == ["Once upon a time", "The"]
    assert all(w for w in want)          # a random model still writes something


def test_generate_cli_stops_at_eos_and_sampling_follows_the_seed(tmp_path, tok, hf_dir, capsys):
    a, b = tok.encode("moon")[0], tok.encode("river")[-1]
    last = tok.encode("Hello")[-1]
    assert len({a, b, last, tok.eos_id}) == 4
    d = tmp_path / "scripted"
    jaxllm.save_hf(d, CFG, scripted_params(tok, {last: a, a: b, b: tok.eos_id}))
    shutil.copy(tok.path, d / "tokenizer.model")
    code, out, err = run_cli(capsys, "generate", d, "--prompt", "Hello", "--max-new-tokens", 20)
    assert code == 0, err
    assert out == tok.decode([a, b]) + "\n"          # stopped at eos, which is not printed
    runs = [run_cli(capsys, "generate", hf_dir, "--prompt", "Hello", "--max-new-tokens", 8, "--temperature", 1,
                    "--seed", s)[1] for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_cli_errors_are_one_line_with_exit_2(tmp_path, hf_dir, capsys):
    bare = tmp_path / "no_tokenizer"
    jaxllm.save_hf(bare, CFG, jaxllm.init_params(CFG, jax.random.key(0)))
    cases = [
        (["generate", bare, "--prompt", "hi"], rf"{bare} has no tokenizer .*pass --tokenizer PATH"),
        (["generate", tmp_path / "missing", "--prompt", "hi"], r"does not exist"),
        (["generate", hf_dir, "--prompt", "hi", "--max-new-tokens", 0], r"max_new_tokens must be a positive integer"),
        (["generate", hf_dir, "--prompt", "hi " * 200, "--max-new-tokens", 8], r"exceeds the model's max_seq_len=128"),
        (["generate", hf_dir, "--prompt", "hi", "--top-p", 2], r"top_p must be in \(0, 1\]"),
        (["eval", hf_dir], r"give --data FILE"),
        (["eval", hf_dir, "--data", tmp_path / "none-*.jsonl"], r"none-\*\.jsonl"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("jaxllm: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
    # --tokenizer fixes the first case
    code, out, err = run_cli(capsys, "generate", bare, "--prompt", "hi", "--max-new-tokens", 3,
                             "--tokenizer", hf_dir / "tokenizer.model")
    assert code == 0 and out.strip(), err


def test_a_reward_model_is_refused_in_one_line_by_generate_chat_and_eval(tmp_path, tok, hf_dir, capsys):
    from jaxllm.training.reward import init_reward_params
    rm = tmp_path / "rm"   # an exported *ForSequenceClassification, and its orbax checkpoint dir
    jaxllm.save_hf(rm, CFG, init_reward_params(CFG, jax.random.key(0)), head="reward", pad_token_id=tok.pad_id,
                   eos_token_id=tok.eos_id)
    shutil.copy(tok.path, rm / "tokenizer.model")
    assert run_cli(capsys, "convert", rm, tmp_path / "ck", "--to", "orbax")[0] == 0
    for argv in (["generate", rm, "--prompt", "hi"], ["chat", rm], ["eval", rm, "--data", "x.jsonl"],
                 ["generate", tmp_path / "ck", "--prompt", "hi", "--tokenizer", tok.path]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and "is a reward model (a scalar head, no LM head)" in err, err


def test_eval_numbers_out_of_range_are_refused_before_the_model_or_lm_eval_loads(hf_dir, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr("jaxllm.evaluation.source.load_model", no_load)
    monkeypatch.setitem(sys.modules, "lm_eval", None)   # checked without lm_eval installed
    for flag, value, message in (("--batch-size", 0, "--batch-size must be >= 1"),
                                 ("--num-fewshot", -1, "--num-fewshot must be >= 0"),
                                 ("--limit", 0, "--limit must be > 0"), ("--limit", "nan", "--limit must be > 0"),
                                 ("--seq-len", 1, "--seq-len must be >= 2")):
        code, out, err = run_cli(capsys, "eval", hf_dir, "--tasks", "t", flag, value)
        assert code == 2 and err.count("\n") == 1 and message in err, (flag, value, err)


def test_generate_with_an_empty_prompt_and_no_bos_is_refused(tok, hf_dir):
    cfg, params = jaxllm.load_hf(hf_dir)
    with pytest.raises(jaxllm.UserError, match="prompt 0 is empty"):
        generate_text(params, cfg, tok, [""], max_new_tokens=4, key=jax.random.key(0), add_bos=False)
    with pytest.raises(jaxllm.UserError, match="texts must be a list of strings"):
        generate_text(params, cfg, tok, "one string", max_new_tokens=4, key=jax.random.key(0))


# ------------------------------------------------------------------ a training run as SRC
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data):
    run = tmp_path_factory.mktemp("run") / "run"
    cfg = jaxllm.load_config("configs/pretrain/tiny.yaml", [
        f"data.tokenizer={data['tokenizer']}", f"data.sources=[{{path: '{data['train']}'}}]",
        f"data.eval_sources=[{{path: '{data['eval']}'}}]", "train.steps=4", "train.eval_every=4",
        "train.eval_batches=0", "train.batch_size=4", "train.seq_len=64", "train.progress=false", "mesh.devices=1",
        f"train.run_dir={run}", "checkpoint.every=4", "checkpoint.async_save=false"])
    summary = jaxllm.train(cfg)
    return run, summary


def test_run_dir_and_its_checkpoint_dir_generate_with_the_runs_tokenizer(run_dir, tok, capsys):
    run, _ = run_dir
    outs = []
    for src in (run, run / "checkpoints"):
        code, out, err = run_cli(capsys, "generate", src, "--prompt", "Once", "--max-new-tokens", 5, "--json")
        assert code == 0, err
        outs.append(json.loads(out)[0]["completion"])
    assert outs[0] == outs[1]
    from jaxllm.training.checkpoint import load_params
    params, model = load_params(run)
    cfg = jaxllm.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
    assert outs[0] == generate_text(params, cfg, tok, ["Once"], max_new_tokens=5, key=jax.random.key(0))[0]


def test_eval_cli_reports_the_runs_own_held_out_perplexity(run_dir, data, capsys):
    run, summary = run_dir
    code, out, err = run_cli(capsys, "eval", run, "--data", data["eval"], "--seq-len", 64, "--batch-size", 4)
    assert code == 0, err
    got = json.loads(out)
    # same documents, same bos/eos, same loss: packing differs, but no token sees another document
    np.testing.assert_allclose(got["nll"], summary["eval"]["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(got["ppl"], summary["eval"]["eval_ppl"], rtol=1e-4)


def test_eval_of_a_run_defaults_to_its_train_seq_len_and_says_so(run_dir, data, capsys):
    run, summary = run_dir   # trained at train.seq_len=64; the model's max_seq_len is larger
    for src in (run, run / "checkpoints"):
        code, out, err = run_cli(capsys, "eval", src, "--data", data["eval"], "--batch-size", 4)
        assert code == 0, err
        got = json.loads(out)
        assert got["seq_len"] == 64 and "--seq-len 64 (train.seq_len of" in err, err
        np.testing.assert_allclose(got["nll"], summary["eval"]["eval_loss"], rtol=1e-5)


# ------------------------------------------------------------------ perplexity
def test_file_perplexity_is_token_weighted_nll_of_each_document(tmp_path, tok, hf_dir):
    cfg, params = jaxllm.load_hf(hf_dir)
    docs = ["The quick brown fox jumps over the lazy dog.", "A", "Numbers like 12345 split into digits."]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    got = file_perplexity(params, cfg, tok, [str(path)], seq_len=64, batch_size=2)   # no document split
    nll, n = 0.0, 0
    for d in docs:
        ids = [tok.bos_id] + tok.encode(d) + [tok.eos_id]
        logits = jaxllm.forward(params, jnp.asarray([ids]), cfg)[0, :-1]
        lp = jax.nn.log_softmax(logits)[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]
        nll -= float(lp.sum())
        n += len(ids) - 1
    assert got["tokens"] == n
    np.testing.assert_allclose(got["nll"], nll / n, rtol=1e-5)
    np.testing.assert_allclose(got["ppl"], np.exp(nll / n), rtol=1e-5)


# ------------------------------------------------------------------ jaxllm chat
def test_chat_streams_answers_and_stops_at_end_of_turn(tmp_path, tok, capsys, monkeypatch):
    nl = chat_prompt([{"role": "user", "content": "hi"}], tok)[-1]   # last token of the assistant header
    a, b = tok.encode("moon")[0], tok.encode("river")[-1]
    d = tmp_path / "chatty"
    jaxllm.save_hf(d, CFG, scripted_params(tok, {nl: a, a: b, b: tok.im_end_id}))
    shutil.copy(tok.path, d / "tokenizer.model")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nhow are you?\n/reset\nagain\n/exit\nnever read\n"))
    code, out, err = run_cli(capsys, "chat", d, "--temperature", 0, "--max-new-tokens", 40)
    assert code == 0, err
    answer = tok.decode([a, b])
    assert out == f"{answer}\n" * 3                  # three turns, each ended by <|im_end|>
    assert "stopped after" not in err and "conversation cleared" in err


def test_chat_drops_the_earliest_turns_when_the_window_is_full(tmp_path, tok, capsys, monkeypatch):
    nl = chat_prompt([{"role": "user", "content": "hi"}], tok)[-1]
    a = tok.encode("moon")[0]
    d = tmp_path / "chatty"
    jaxllm.save_hf(d, CFG, scripted_params(tok, {nl: a, a: tok.im_end_id}))
    shutil.copy(tok.path, d / "tokenizer.model")
    # three ~45-token messages overflow the 128 - 8 = 120 tokens a prompt may take; one of ~200 alone does
    k = next(k for k in range(5, 200) if len(tok.encode("word " * k)) >= 45)
    msg = "word " * k
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{msg}\n{msg}\n{msg}\n{msg * 5}\n{msg}\n"))
    code, out, err = run_cli(capsys, "chat", d, "--temperature", 0, "--max-new-tokens", 8)
    assert code == 0, err
    assert out == f"{tok.decode([a])}\n" * 4          # the long message got no answer, the others did
    assert "dropped the earliest exchange" in err
    assert "that message alone is longer than the model's window" in err


# ------------------------------------------------------------------ sample_completions
def test_sample_completions_are_reproducible_and_equal_on_the_training_mesh(tok, hf_dir):
    cfg, params = jaxllm.load_hf(hf_dir)
    prompts = ["Once upon a time", "The dog", "In the"]
    a = sample_completions(params, cfg, tok, prompts, 8, jax.random.key(4))
    assert [x["prompt"] for x in a] == prompts and all(isinstance(x["completion"], str) for x in a)
    assert a == sample_completions(params, cfg, tok, prompts, 8, jax.random.key(4))
    assert a != sample_completions(params, cfg, tok, prompts, 8, jax.random.key(5))
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2, preset="fsdp_tp")
    mesh, rules = mesh_lib.make_mesh(mesh_cfg), rules_lib.logical_rules(mesh_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        placed = jax.device_put(params, rules_lib.param_shardings(jaxllm.param_logical_axes(cfg), params, rules, mesh))
        assert sample_completions(placed, cfg, tok, prompts, 8, jax.random.key(4)) == a


def test_sft_samples_are_user_turns_in_the_chat_template_ended_at_end_of_turn(tok):
    """An SFT run's sample prompts are rendered as user turns up to the assistant header (what
    it trained on) and the answer stops at <|im_end|>; as raw text the model sees no header."""
    from jaxllm.data.chat import resolve_template
    nl = chat_prompt([{"role": "user", "content": "hi"}], tok)[-1]   # last token of the assistant header
    a, b = tok.encode("moon")[0], tok.encode("river")[-1]
    params = scripted_params(tok, {nl: a, a: b, b: tok.im_end_id})
    got = sample_completions(params, CFG, tok, ["hi"], 8, jax.random.key(0), temperature=0.0,
                             chat_template=resolve_template(tok))
    assert got == [{"prompt": "hi", "completion": tok.decode([a, b])}]
    raw = sample_completions(params, CFG, tok, ["hi"], 8, jax.random.key(0), temperature=0.0)
    assert raw[0]["completion"] != got[0]["completion"]


def test_chat_and_rank_prompt_a_run_with_the_template_it_trained_with(tmp_path):
    """`jaxllm chat` / `data rank` default to the run's data.chat_template; another one given on
    the command line is used, and said to differ in one line."""
    from jaxllm.evaluation.source import template_for
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  kind: chat\n  chat_template: my.jinja\n")
    said = []
    assert template_for(run, None, said.append) == "my.jinja" and "data.chat_template of" in said[-1]
    assert template_for(run / "checkpoints", None, said.append) == "my.jinja"   # a checkpoint dir of the run
    assert template_for(run, "chatml", said.append) == "chatml"
    assert "--chat-template 'chatml' is not the template" in said[-1]
    n = len(said)
    (run / "config.yaml").write_text("data:\n  kind: chat\n")                   # trained with the default
    assert template_for(run, None, said.append) == "" and template_for(run, "chatml", said.append) == "chatml"
    assert len(said) == n                                                        # nothing to say
    from jaxllm.cli import build_parser
    for argv in (["chat", str(run)], ["data", "rank", "--model", str(run), "--prompts", "p", "--out", "o"]):
        assert build_parser().parse_args(argv).chat_template is None


# ------------------------------------------------------------------ lm-eval adapter
def need_lm_eval():
    pytest.importorskip("lm_eval", reason="the `eval` extra (lm-eval) is not installed")


@pytest.fixture(scope="module")
def lm(tok, hf_dir):
    need_lm_eval()
    from jaxllm.evaluation.lm_eval_adapter import JaxLLM
    cfg, params = jaxllm.load_hf(hf_dir)
    return JaxLLM(params, cfg, tok, batch_size=3, max_length=32, max_gen_toks=6)


def seq_logprob(lm, context, continuation):
    """log p(continuation | context) and whether each token is the argmax, by one forward."""
    ids = jnp.asarray([list(context) + list(continuation)])
    logits = jaxllm.forward(lm.params, ids, lm.model_cfg)[0, len(context) - 1:-1]
    cont = jnp.asarray(continuation)
    lp = jax.nn.log_softmax(logits)[jnp.arange(len(continuation)), cont]
    return float(lp.sum()), bool((jnp.argmax(logits, -1) == cont).all())


def test_adapter_loglikelihood_equals_a_forward_pass(lm, tok):
    from lm_eval.api.instance import Instance
    pairs = [("The quick brown", " fox"), ("Once upon a", " time there was"), ("", "Hello world"),
             ("x " * 40 + "y", " end")]             # longer than max_length: the context is cut
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        if ctx:
            whole, c = tok.encode(ctx + cont), tok.encode(ctx)
            ctx_ids, cont_ids = c, whole[len(c):]
        else:
            ctx_ids, cont_ids = [tok.bos_id], tok.encode(cont)   # empty context: after bos
        ctx_ids = (ctx_ids + cont_ids)[-(32 + 1):][:-len(cont_ids)]
        want, want_greedy = seq_logprob(lm, ctx_ids, cont_ids)
        np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-4)
        assert greedy == want_greedy
    # is_greedy is really computed: a continuation made of the model's own argmax is greedy
    ctx = tok.encode("The quick brown")
    nxt = int(jnp.argmax(jaxllm.forward(lm.params, jnp.asarray([ctx]), lm.model_cfg)[0, -1]))
    assert lm.score_tokens([(ctx, [nxt])])[0][1] is True


def test_adapter_rolling_loglikelihood_sums_disjoint_windows(lm, tok):
    from lm_eval.api.instance import Instance
    text = " ".join(f"word{i}" for i in range(40))
    ids = tok.encode(text)
    assert len(ids) > 2 * 32                          # three windows of max_length=32
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    want = 0.0
    for start in range(0, len(ids), 32):              # window k predicts ids[32k : 32k+32] ...
        chunk = ids[start:start + 32]
        # ... after bos (the first), the token before it (full windows), or as much context as
        # fits in 32 inputs (the last, partial window)
        ctx = [tok.bos_id] if start == 0 else ids[max(0, start + len(chunk) - 33):start]
        want += seq_logprob(lm, ctx, chunk)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_adapter_generate_until_is_greedy_generation_cut_at_until(lm, tok):
    from lm_eval.api.instance import Instance
    contexts = ["Once upon a time", "The dog", "A", "Numbers: 1 2 3"]
    free = generate_text(lm.params, lm.model_cfg, tok, contexts, max_new_tokens=6, key=jax.random.key(0),
                         add_bos=False)
    until = free[0][2:4] or "zzz"                     # a piece of the first answer: it must be cut there
    reqs = [Instance("generate_until", {}, (c, {"until": [until], "max_gen_toks": 6}), i)
            for i, c in enumerate(contexts)]
    got = lm.generate_until(reqs)
    assert got == [f.split(until, 1)[0] for f in free]
    assert len(got[0]) <= 2 < len(free[0])
    with pytest.raises(jaxllm.UserError, match=r"unsupported gen_kwargs \['num_beams'\]"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"num_beams": 4}), 0)])


def task_yaml(name: str, data: str, body: str) -> str:
    """An lm-eval task over a local JSONL file (datasets' json builder: no download)."""
    return (f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs: {{data_files: {{test: DIR/{data}}}, cache_dir: DIR/hf_cache}}\n"
            f"test_split: test\n{body}")


TASKS = {
    "jx_choice": task_yaml("jx_choice", "choice.jsonl", """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: answer
metric_list: [{metric: acc}]
"""),
    "jx_ppl": task_yaml("jx_ppl", "text.jsonl", """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}]
"""),
    "jx_gen": task_yaml("jx_gen", "choice.jsonl", """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[answer]}}"
generation_kwargs: {until: ["."], max_gen_toks: 5, do_sample: false}
metric_list: [{metric: exact_match}]
"""),
}


# lm-eval joins question and choice with its target_delimiter, a space
QA = [{"question": "The cat sat on the", "choices": ["mat", "moon", "river"], "answer": 0},
      {"question": "Once upon a", "choices": ["time", "dog"], "answer": 1},
      {"question": "One two", "choices": ["three", "four", "five"], "answer": 2}]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Numbers like 12345 and words."}]


def write_tasks(directory):
    (directory / "choice.jsonl").write_text("".join(json.dumps(d) + "\n" for d in QA))
    (directory / "text.jsonl").write_text("".join(json.dumps(d) + "\n" for d in TEXTS))
    for name, yaml in TASKS.items():
        (directory / f"{name}.yaml").write_text(yaml.replace("DIR", str(directory)))


def choice_accuracy(lm, tok) -> float:
    """jx_choice's acc recomputed: the choice of highest log p(" " + choice | question)."""
    correct = 0
    for d in QA:
        scores = []
        for choice in d["choices"]:
            whole, ctx = tok.encode(d["question"] + " " + choice), tok.encode(d["question"])
            scores.append(seq_logprob(lm, ctx, whole[len(ctx):])[0])
        correct += int(np.argmax(scores) == d["answer"])
    return correct / len(QA)


def test_lm_eval_runs_local_tasks_offline_and_agrees_with_the_adapter(tmp_path, lm, tok):
    """lm-eval itself, end to end (no download): a multiple-choice, a rolling-perplexity and a
    generation task from local YAML + JSONL; each metric recomputed from jaxllm forwards."""
    from jaxllm.evaluation.lm_eval_adapter import run_tasks
    write_tasks(tmp_path)
    results = run_tasks(lm, list(TASKS), include_path=str(tmp_path), include_defaults=False)["results"]

    qa, texts = QA, TEXTS
    np.testing.assert_allclose(results["jx_choice"]["acc,none"], choice_accuracy(lm, tok))

    assert all(len(tok.encode(t["text"])) <= 32 for t in texts)   # one window each
    ll = sum(seq_logprob(lm, [tok.bos_id], tok.encode(t["text"]))[0] for t in texts)
    words = sum(len(t["text"].split()) for t in texts)
    np.testing.assert_allclose(results["jx_ppl"]["word_perplexity,none"], np.exp(-ll / words), rtol=1e-4)

    outs = generate_text(lm.params, lm.model_cfg, tok, [d["question"] for d in qa], max_new_tokens=5,
                         key=jax.random.key(0), add_bos=False)
    hits = [o.split(".", 1)[0] == d["choices"][d["answer"]] for o, d in zip(outs, qa)]
    np.testing.assert_allclose(results["jx_gen"]["exact_match,none"], np.mean(hits))


@pytest.mark.slow
def test_eval_cli_runs_lm_eval_tasks_and_names_an_unknown_one(hf_dir, lm, tok, tmp_path, capsys):
    write_tasks(tmp_path)
    code, out, err = run_cli(capsys, "eval", hf_dir, "--tasks", "jx_choice", "--include-path", tmp_path,
                             "--seq-len", 32, "--batch-size", 2)
    assert code == 0, err
    np.testing.assert_allclose(json.loads(out)["results"]["jx_choice"]["acc,none"], choice_accuracy(lm, tok))
    code, out, err = run_cli(capsys, "eval", hf_dir, "--tasks", "no_such_task_xyz", "--include-path", tmp_path)
    assert code == 2 and "lm-eval knows no task ['no_such_task_xyz']" in err, err


def test_chat_exact_match_pads_batches_without_moving_an_answer(tok):
    """chat_exact_match left-pads each chunk to a width bucket and pads the last chunk with copies
    of a prompt: every conversation's answer must still be its own greedy continuation. The
    references are those continuations (decoded one conversation at a time) for even
    conversations and a wrong string for odd ones, so the score is exactly 4/7 (7 conversations: chunks of 4 and 3)."""
    from jaxllm.evaluation.chat import end_of_turn_ids
    from jaxllm.evaluation.exact_match import chat_exact_match
    from jaxllm.model.generate import generate
    params = jaxllm.init_params(CFG, jax.random.key(7))
    stops = end_of_turn_ids(tok)
    words = "the cat sat on a mat near the old river and sang".split()
    convs = [[{"role": "user", "content": " ".join(words[:1 + i])}, {"role": "assistant", "content": ""}]
             for i in range(7)]
    for i, c in enumerate(convs):
        out = generate(params, [chat_prompt(c[:1], tok)], CFG, max_new_tokens=8, key=jax.random.key(0),
                       eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=stops, vocab_limit=tok.vocab_size)
        alone = tok.decode([int(t) for t, m in zip(out.tokens[0], out.mask[0]) if m and int(t) not in stops])
        c[1]["content"] = alone.strip() if i % 2 == 0 else "\u2603 not an answer"
    got = chat_exact_match(params, CFG, tok, convs, max_new_tokens=8, batch_size=4)
    assert got["n"] == 7 and got["exact_match"] == 4 / 7, got
