"""Embedded post-training data: chat for SFT, ranked responses for reward models, PPO prompts.

All of it is built on the same `synthetic.World` the pretraining corpus describes, so a model
pretrained on that corpus already knows the facts these tasks ask about. The preference is
programmatic (`score_response`): a reward model can be checked against it, and PPO can be
scored by it without a learned reward. Records (one JSON object per line when written):

  chat:   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  reward: {"prompt": str, "task": {...}, "responses": [best, ..., worst], "scores": [...]}
  ppo:    {"prompt": str, "task": {...}}
"""
from __future__ import annotations

import random
import re
from typing import Iterator

from jaxllm.data.world import COLORS, FEELINGS, NAMES, World, split_rng

TASK_KINDS = ("add", "capital", "color", "count", "story")
NEGATIVE_WORDS = ("sad", "angry", "scared", "lonely")
# The demonstrators (the SFT chat data) end half their stories on a negative feeling; the
# preference (score_response) penalises one. So SFT imitates a habit the rankings dislike, and
# only the reward model can teach the policy otherwise: the gap RLHF exists for (InstructGPT's
# labelers rank better than they write). On the other tasks the demonstrations are perfect and
# what is left is the model's own error (arithmetic, counting), which a reward model of the
# policy's size can hardly verify.
NEGATIVE_DEMO_RATE = 0.5
SYSTEM_PROMPT = "You are a helpful assistant."


_TASK_FIELDS = {"add": {"a": int, "b": int}, "capital": {"kingdom": str}, "color": {"name": str},
                "count": {"start": int, "end": int}, "story": {"name": str}}


def task_problem(task, world: World | None = None) -> str | None:
    """Why `task` is not a synthetic task that score_response grades (None: it is one)."""
    if not isinstance(task, dict):
        return f"'task' must be an object, got {type(task).__name__}"
    kind = task.get("kind")
    if kind not in _TASK_FIELDS:
        return f"task kind {kind!r} is not one of the synthetic tasks {list(TASK_KINDS)}"
    for key, typ in _TASK_FIELDS[kind].items():
        if not isinstance(task.get(key), typ) or isinstance(task.get(key), bool):
            return f"a {kind!r} task needs {key!r} ({typ.__name__})"
    world = world or World()
    known = {"capital": ("kingdom", world.capital), "color": ("name", world.favorite_color),
             "story": ("name", world.pet)}.get(kind)
    if known and task[known[0]] not in known[1]:
        return f"the {kind!r} task's {known[0]} {task[known[0]]!r} is not in the synthetic world"
    if kind == "count" and task["end"] < task["start"]:
        return "a 'count' task needs end >= start"
    return None


def sample_task(rng: random.Random, world: World) -> dict:
    kind = rng.choice(TASK_KINDS)
    if kind == "add":
        return {"kind": kind, "a": rng.randint(0, 20), "b": rng.randint(0, 20)}
    if kind == "capital":
        return {"kind": kind, "kingdom": rng.choice(world.kingdoms)}
    if kind == "color":
        return {"kind": kind, "name": rng.choice(NAMES)}
    if kind == "count":
        start = rng.randint(0, 30)
        return {"kind": kind, "start": start, "end": start + rng.randint(3, 8)}
    return {"kind": kind, "name": rng.choice(NAMES)}


def prompt_text(task: dict) -> str:
    k = task["kind"]
    if k == "add":
        return f"What is {task['a']} + {task['b']}?"
    if k == "capital":
        return f"What is the capital of {task['kingdom']}?"
    if k == "color":
        return f"What is the favorite color of {task['name']}?"
    if k == "count":
        return f"Count from {task['start']} to {task['end']}."
    return f"Tell me a short story about {task['name']}."


def good_response(task: dict, world: World, rng: random.Random | None = None) -> str:
    k = task["kind"]
    if k == "add":
        return f"{task['a']} + {task['b']} = {task['a'] + task['b']}."
    if k == "capital":
        return f"The capital of {task['kingdom']} is {world.capital[task['kingdom']]}."
    if k == "color":
        return f"The favorite color of {task['name']} is {world.favorite_color[task['name']]}."
    if k == "count":
        return ", ".join(str(i) for i in range(task["start"], task["end"] + 1)) + "."
    return _story(task["name"], world, (rng or random.Random(0)).choice(FEELINGS))


def _story(n: str, world: World, feeling: str) -> str:
    return f"{n} played with the {world.pet[n]} all day, and {n} was very {feeling}."


def demonstration(task: dict, world: World, rng: random.Random) -> str:
    """What the SFT data's assistant writes: `good_response`, except that a story ends on a
    negative feeling with probability NEGATIVE_DEMO_RATE (which the preference penalises)."""
    if task["kind"] == "story" and rng.random() < NEGATIVE_DEMO_RATE:
        return _story(task["name"], world, rng.choice(NEGATIVE_WORDS))
    return good_response(task, world, rng)


def score_response(task: dict, response: str, world: World | None = None) -> float:
    """The programmatic preference: correctness in [-1, 1], minus 0.05 per word beyond 25."""
    world = world or World()
    k, words = task["kind"], response.split()
    penalty = min(0.5, 0.05 * max(0, len(words) - 25))
    nums = [int(x) for x in re.findall(r"-?\d+", response)]
    if k == "add":
        m = re.search(r"=\s*(-?\d+)", response)
        got = int(m.group(1)) if m else (nums[-1] if nums else None)
        truth = task["a"] + task["b"]
        score = -1.0 if got is None else (1.0 if got == truth else -min(1.0, abs(got - truth) / 10))
    elif k in ("capital", "color"):
        truth = world.capital[task["kingdom"]] if k == "capital" else world.favorite_color[task["name"]]
        wrong = set(world.capital.values()) if k == "capital" else set(COLORS)
        present = set(re.findall(r"[A-Za-z]+", response))
        score = 1.0 if truth in present else (-0.5 if present & (wrong - {truth}) else -1.0)
    elif k == "count":
        want = list(range(task["start"], task["end"] + 1))
        prefix = 0
        while prefix < min(len(nums), len(want)) and nums[prefix] == want[prefix]:
            prefix += 1
        score = 2 * prefix / len(want) - 1 - 0.1 * max(0, len(nums) - len(want))
    else:
        n = task["name"]
        low = response.lower()
        good = [n in response, world.pet[n] in low, any(f in low for f in FEELINGS),
                response.rstrip().endswith(".")]
        score = 2 * sum(good) / len(good) - 1 - (0.5 if any(w in low for w in NEGATIVE_WORDS) else 0)
    return round(max(-1.5, score - penalty), 4)


def _variants(task: dict, world: World, rng: random.Random) -> list[str]:
    """Candidate responses of deliberately different quality (the ranking is still by score)."""
    k, good = task["kind"], good_response(task, world, rng)
    filler = " ".join(["I think about this question for a long time and then I answer it."] * 3)
    if k == "add":
        t = task["a"] + task["b"]
        return [good, f"{task['a']} + {task['b']} = {t + rng.choice([-1, 1])}.",
                f"{task['a']} + {task['b']} = {t + rng.choice([-1, 1]) * rng.randint(3, 8)}.",
                "I like to eat apples."]
    if k in ("capital", "color"):
        pool = list(world.capital.values()) if k == "capital" else COLORS
        truth = good.rstrip(".").split()[-1]
        wrong = rng.choice([w for w in pool if w != truth])
        cut = good.rfind(truth)
        return [good, f"{filler} {good}", good[:cut] + wrong + good[cut + len(truth):], "I do not know."]
    if k == "count":
        want = list(range(task["start"], task["end"] + 1))
        half = ", ".join(str(i) for i in want[: len(want) // 2]) + "."
        by_two = ", ".join(str(want[0] + 2 * i) for i in range(len(want))) + "."
        # A count that stops a little early or runs a little late: without it a reward model
        # learns "a few numbers from the start" and PPO exploits that (measured: counts cut to 4).
        end = task["end"] + rng.choice([-2, -1, 1, 2])
        near = ", ".join(str(i) for i in range(task["start"], end + 1)) + "."
        return [good, near, half, by_two]
    n = task["name"]
    # the good story on a negative feeling (the demonstrations' habit) scores 0.0
    return [good, _story(n, world, rng.choice(NEGATIVE_WORDS)), f"{n} was sad and angry all day.", "the sky is big"]


def _rng(seed: int, split: str, salt: int) -> random.Random:
    return split_rng(seed, split, salt)


def chat_examples(n: int, seed: int = 0, split: str = "train", world: World | None = None) -> Iterator[dict]:
    """Single-turn (about 60%) and multi-turn conversations whose follow-ups refer back."""
    world, rng = world or World(), _rng(seed, split, 11)
    for _ in range(n):
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
        turns = 1 if rng.random() < 0.6 else rng.randint(2, 3)
        last = None  # the task the previous assistant turn answered (None: not a task answer)
        for t in range(turns):
            if last is not None and last["kind"] == "add" and rng.random() < 0.7:
                c = rng.randint(1, 9)
                task = {"kind": "add", "a": last["a"] + last["b"], "b": c}
                user = f"Now add {c} to that."
            elif last is not None and last["kind"] == "capital" and rng.random() < 0.7:
                kd = last["kingdom"]
                msgs += [{"role": "user", "content": f"And what is {kd} famous for?"},
                         {"role": "assistant", "content": f"{kd} is famous for its {world.export[kd]}."}]
                last = None
                continue
            else:
                task = sample_task(rng, world)
                user = prompt_text(task)
            msgs += [{"role": "user", "content": user},
                     {"role": "assistant", "content": demonstration(task, world, rng)}]
            last = task
        yield {"messages": msgs}


def reward_examples(n: int, seed: int = 0, split: str = "train", world: World | None = None,
                    k: int = 4) -> Iterator[dict]:
    """Prompts with `k` responses ranked best-first by `score_response` (scores all distinct)."""
    world, rng = world or World(), _rng(seed, split, 22)
    made = 0
    while made < n:
        task = sample_task(rng, world)
        cands = _variants(task, world, rng)[:k]
        scored = sorted(((score_response(task, r, world), r) for r in cands), key=lambda x: -x[0])
        if len({s for s, _ in scored}) < len(scored):  # a tie carries no ranking signal
            continue
        made += 1
        yield {"prompt": prompt_text(task), "task": task,
               "responses": [r for _, r in scored], "scores": [s for s, _ in scored]}


def ppo_prompts(n: int, seed: int = 0, split: str = "train", world: World | None = None) -> Iterator[dict]:
    """Prompts for RL; reward a generated answer with `score_response(record['task'], answer)`."""
    world, rng = world or World(), _rng(seed, split, 33)
    for _ in range(n):
        task = sample_task(rng, world)
        yield {"prompt": prompt_text(task), "task": task}
