"""The embedded default data: seeded, consistent with one world, ranked by the stated preference."""
import json
import re

import pytest

from jaxllm.data import synthetic, synthetic_tasks
from jaxllm.data.synthetic import World
from jaxllm.data.synthetic_tasks import score_response

WORLD = World()


def test_same_seed_same_documents_and_splits_differ():
    a = list(synthetic.pretrain_docs(200, seed=1))
    assert a == list(synthetic.pretrain_docs(200, seed=1))
    assert a != list(synthetic.pretrain_docs(200, seed=2))
    held_out = set(synthetic.pretrain_docs(2000, seed=1, split="eval"))
    assert not held_out & set(synthetic.pretrain_docs(20_000, seed=1))
    for gen in (synthetic_tasks.chat_examples, synthetic_tasks.reward_examples, synthetic_tasks.ppo_prompts):
        assert list(gen(30, 1)) == list(gen(30, 1)) != list(gen(30, 1, "eval"))


def test_twenty_thousand_documents_cover_every_kind():
    # (speed is measured, not asserted: a wall-clock bound is flaky on a shared machine)
    docs = list(synthetic.pretrain_docs(20_000))
    assert len(docs) == 20_000 and len(set(docs)) > 15_000
    kinds = {d.split()[0] for d in docs}
    assert {"Once", "Arithmetic", "Facts.", "Counting"} <= kinds


def test_every_stated_fact_agrees_with_the_world():
    text = "\n".join(synthetic.pretrain_docs(2000, seed=4)) + "\n".join(
        synthetic.pretrain_docs(200, seed=4, split="eval"))
    capitals = re.findall(r"The capital of (\w+) is (\w+)\.", text)
    assert len(capitals) > 100
    assert all(WORLD.capital[k] == c for k, c in capitals)
    for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", text):
        assert eval(f"{a} {op} {b}") == int(c)
    colors = re.findall(r"The favorite color of (\w+) is (\w+)\.", text)
    assert colors and all(WORLD.favorite_color[n] == c for n, c in colors)


def test_long_documents_exist_so_splitting_is_exercised():
    assert max(len(d) for d in synthetic.pretrain_docs(500)) > 3000


def test_chat_examples_alternate_roles_and_follow_ups_are_correct():
    convs = list(synthetic_tasks.chat_examples(400))
    multi = [c for c in convs if sum(m["role"] == "user" for m in c["messages"]) > 1]
    assert 0.25 < len(multi) / len(convs) < 0.55
    for c in convs:
        roles = [m["role"] for m in c["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    # "Now add c to that." refers to the previous answer and is answered correctly.
    follow = 0
    for c in convs:
        msgs = c["messages"]
        for i, m in enumerate(msgs):
            if m["content"].startswith("Now add"):
                prev = int(re.search(r"= (\d+)\.", msgs[i - 1]["content"]).group(1))
                c_add = int(re.search(r"add (\d+)", m["content"]).group(1))
                assert msgs[i + 1]["content"] == f"{prev} + {c_add} = {prev + c_add}."
                follow += 1
    assert follow > 10


def test_reward_examples_are_ranked_by_the_programmatic_preference():
    for ex in synthetic_tasks.reward_examples(300, k=4):
        assert len(ex["responses"]) == 4
        scores = [score_response(ex["task"], r) for r in ex["responses"]]
        assert scores == ex["scores"]
        assert all(a > b for a, b in zip(scores, scores[1:]))  # strictly best-first
        assert ex["responses"][0] == synthetic_tasks.good_response(ex["task"], WORLD,
                                                                    None) or ex["task"]["kind"] == "story"


@pytest.mark.parametrize("task, better, worse", [
    ({"kind": "add", "a": 7, "b": 5}, "7 + 5 = 12.", "7 + 5 = 13."),
    ({"kind": "add", "a": 7, "b": 5}, "7 + 5 = 13.", "7 + 5 = 30."),
    ({"kind": "count", "start": 3, "end": 7}, "3, 4, 5, 6, 7.", "3, 4, 5."),
    ({"kind": "story", "name": "Ada"}, f"Ada played with the {WORLD.pet['Ada']} and was happy.",
     "Ada was sad."),
])
def test_score_prefers_correct_and_complete_answers(task, better, worse):
    assert score_response(task, better) > score_response(task, worse)


def test_score_penalises_rambling_and_knows_the_world():
    task = {"kind": "capital", "kingdom": WORLD.kingdoms[0]}
    right = f"The capital of {WORLD.kingdoms[0]} is {WORLD.capital[WORLD.kingdoms[0]]}."
    wrong_capital = right.replace(WORLD.capital[WORLD.kingdoms[0]], WORLD.capital[WORLD.kingdoms[1]])
    assert score_response(task, right) == 1.0
    assert score_response(task, "word " * 40 + right) < 1.0
    assert score_response(task, wrong_capital) == -0.5
    assert score_response(task, "no idea") == -1.0


def test_ppo_prompts_carry_their_task_for_the_reward():
    for rec in synthetic_tasks.ppo_prompts(50):
        assert rec["prompt"] == synthetic_tasks.prompt_text(rec["task"])
        assert score_response(rec["task"], synthetic_tasks.good_response(rec["task"], WORLD)) == 1.0


def test_write_corpus_writes_every_split_as_jsonl(tmp_path):
    counts = synthetic.write_corpus(str(tmp_path), train_docs=80, eval_docs=8, shards=2)
    assert counts["pretrain/train-00000.jsonl"] + counts["pretrain/train-00001.jsonl"] == 80
    for rel in ("chat/train.jsonl", "chat/eval.jsonl", "reward/train.jsonl", "reward/eval.jsonl",
                "ppo/train.jsonl", "ppo/eval.jsonl", "pretrain/eval-00000.jsonl"):
        lines = (tmp_path / rel).read_text().splitlines()
        assert len(lines) == counts[rel] > 0
        json.loads(lines[0])


def test_written_eval_split_shares_no_document_with_train(tmp_path):
    synthetic.write_corpus(str(tmp_path), train_docs=20_000, eval_docs=1000, tasks=False)
    def texts(pattern):
        return {json.loads(line)["text"] for f in tmp_path.glob(pattern) for line in f.open()}
    train, held_out = texts("pretrain/train-*.jsonl"), texts("pretrain/eval-*.jsonl")
    assert len(held_out) > 950 and not train & held_out
    assert any(d.startswith("Counting") for d in held_out)


def test_story_demonstrations_carry_a_habit_the_preference_penalises():
    """Half the SFT data's stories end on a negative feeling, which score_response marks down
    (1.0 -> 0.0): the gap between demonstrations and preference that RLHF has to close. The
    rankings rank that story below the good one; the other tasks' demonstrations are the best
    answers."""
    stories, negative = 0, 0
    for conv in synthetic_tasks.chat_examples(600):
        msgs = conv["messages"]
        for q, a in zip(msgs, msgs[1:]):
            m = re.fullmatch(r"Tell me a short story about (\w+)\.", q["content"])
            if q["role"] != "user" or a["role"] != "assistant" or not m:
                continue
            stories += 1
            task = {"kind": "story", "name": m.group(1)}
            bad = any(w in a["content"] for w in synthetic_tasks.NEGATIVE_WORDS)
            negative += bad
            assert score_response(task, a["content"]) == (0.0 if bad else 1.0), a["content"]
    assert stories > 50 and 0.35 < negative / stories < 0.65, (stories, negative)
    for ex in synthetic_tasks.reward_examples(200):
        if ex["task"]["kind"] == "story":
            assert ex["scores"][:2] == [1.0, 0.0]
            assert any(w in ex["responses"][1] for w in synthetic_tasks.NEGATIVE_WORDS)
            assert ex["responses"][1].split(" was very ")[0] == ex["responses"][0].split(" was very ")[0]


@pytest.mark.parametrize("argv, message", [
    (["--train-docs", "-5"], "--train-docs and --eval-docs must be >= 1"),
    (["--eval-docs", "0"], "--train-docs and --eval-docs must be >= 1"),
    (["--shards", "0"], "--shards must be between 1 and --train-docs"),
    (["--train-docs", "3", "--shards", "4"], "--shards must be between 1 and --train-docs (3)")])
def test_data_synth_cli_refuses_counts_that_write_empty_files(tmp_path, capsys, argv, message):
    from jaxllm.cli import main
    assert main(["data", "synth", "--out", str(tmp_path / "synth"), "--no-tasks", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "synth").exists()   # nothing written


def test_data_rank_checks_its_output_path_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from jaxllm.cli import main
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr("jaxllm.evaluation.source.load_model", no_load)
    (tmp_path / "a_file").write_text("")
    for out, message in ((tmp_path, "is a directory; give a file name"),
                         (tmp_path / "a_file" / "x" / "out.jsonl", f"{tmp_path / 'a_file'} is a file")):
        assert main(["data", "rank", "--model", "m", "--prompts", "p.jsonl", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and ".tmp" not in err, err
    # an existing file is not replaced without --overwrite, and never when it is a prompts file
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi", "task": {}}\n')
    for out, extra, message in ((tmp_path / "a_file", [], "exists; pass --overwrite to replace it"),
                                (tmp_path / "p.jsonl", ["--overwrite"], "is one of the --prompts files")):
        argv = ["data", "rank", "--model", "m", "--prompts", str(tmp_path / "p*.jsonl"), "--out", str(out), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert (tmp_path / "p.jsonl").read_text() == '{"prompt": "hi", "task": {}}\n'
