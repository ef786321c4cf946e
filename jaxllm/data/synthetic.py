"""The embedded default corpus: English-like documents generated from a seed, no download.

Every later stage (pretraining, SFT, reward modelling, PPO) trains and is tested on data from
this module and `synthetic_tasks.py`, so the text has structure a tiny model can learn within a
few hundred steps and that a test can measure:
  * a small fixed *world* (people, animals, places, made-up kingdoms with capitals): facts are
    stated consistently everywhere, so they can be memorised;
  * templated stories that repeat their hero's name (copying is learnable in-context);
  * arithmetic facts ("7 + 5 = 12.") and counting sequences (exactly predictable);
  * a few long documents (chapter books) so row splitting is exercised.

The world depends only on `world_seed`; documents on (seed, split). Held-out splits use the same
world and fresh draws, so eval loss measures generalisation over the same facts.
"""
from __future__ import annotations

import json
import os
import random
from typing import Iterator

from jaxllm.data import synthetic_tasks
from jaxllm.data.world import ACTIVITIES, ADJECTIVES, FEELINGS, NAMES, OBJECTS, PLACES, World, split_rng


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def story(rng: random.Random, world: World, episodes: int = 1) -> str:
    name = rng.choice(NAMES)
    animal, adj, place = world.pet[name], rng.choice(ADJECTIVES), rng.choice(PLACES)
    pet_name = rng.choice([n for n in NAMES if n != name])
    parts = [f"Once upon a time, there was {_a(adj)} child named {name} who lived in {place}. "
             f"{name} had {_a(animal)} called {pet_name}. {name} loved the color "
             f"{world.favorite_color[name]} and liked to eat {world.favorite_food[name]}."]
    for _ in range(episodes):
        activity, obj, feeling = rng.choice(ACTIVITIES), rng.choice(OBJECTS), rng.choice(FEELINGS)
        parts.append(f"Every day, {name} and {pet_name} the {animal} liked to {activity}. "
                     f"One day, {name} found {obj}. {name} was very {feeling}. "
                     f"\"Look, {pet_name}!\" said {name}. The {animal} looked at {obj} too.")
    parts.append(f"In the end, {name} and {pet_name} went home, and {name} was {rng.choice(FEELINGS)}."
                 " The end.")
    return " ".join(parts)


def arithmetic(rng: random.Random, world: World) -> str:
    lines = ["Arithmetic practice."]
    for _ in range(rng.randint(4, 10)):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            lines.append(f"{a} * {b} = {a * b}.")
        elif op == "+":
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            lines.append(f"{a} + {b} = {a + b}.")
        else:
            a = rng.randint(0, 50)
            b = rng.randint(0, a)
            lines.append(f"{a} - {b} = {a - b}.")
    return "\n".join(lines)


def counting(rng: random.Random, world: World, held_out: bool = False) -> str:
    # Train counts start in [0, 80], held-out splits in [81, 160]: the few thousand possible
    # sequences would otherwise reappear verbatim in eval.
    start, step = rng.randint(81, 160) if held_out else rng.randint(0, 80), rng.choice([1, 1, 1, 2, 5, 10])
    n = rng.randint(5, 15)
    return f"Counting by {step} from {start}: " + ", ".join(str(start + i * step) for i in range(n)) + "."


def facts(rng: random.Random, world: World) -> str:
    out = []
    for k in rng.sample(world.kingdoms, rng.randint(2, 5)):
        out.append(f"The capital of {k} is {world.capital[k]}. {k} is famous for its "
                   f"{world.export[k]}.")
    for n in rng.sample(NAMES, rng.randint(1, 3)):
        out.append(f"{n} has {_a(world.pet[n])}. The favorite color of {n} is {world.favorite_color[n]}.")
    rng.shuffle(out)
    return "Facts. " + " ".join(out)


# Document kinds and their share of the corpus. "book" is long (thousands of characters) so
# that a 256-token row cannot hold it and the pipeline must split it.
KINDS = (("story", 0.45), ("arithmetic", 0.2), ("facts", 0.15), ("counting", 0.15), ("book", 0.05))


def pretrain_docs(n: int, seed: int = 0, split: str = "train", world: World | None = None,
                  exclude: set[str] | frozenset[str] = frozenset()) -> Iterator[str]:
    """`n` documents of the pretraining corpus; a different `split` draws disjoint randomness,
    and held-out counting documents use their own start range, so no held-out document equals
    a train one. Documents in `exclude` (e.g. the train texts) are skipped and redrawn."""
    world = world or World()
    rng = split_rng(seed, split)
    kinds, weights = zip(*KINDS)
    held_out = split != "train"
    made = 0
    while made < n:
        kind = rng.choices(kinds, weights)[0]
        if kind == "story":
            doc = story(rng, world)
        elif kind == "book":
            doc = "\n\n".join(story(rng, world, episodes=rng.randint(4, 8)) for _ in range(rng.randint(3, 6)))
        elif kind == "counting":
            doc = counting(rng, world, held_out)
        else:
            doc = {"arithmetic": arithmetic, "facts": facts}[kind](rng, world)
        if doc in exclude:
            continue
        made += 1
        yield doc


def write_jsonl(path: str, records) -> int:
    """Write dicts (or strings, as {"text": s}) one per line; returns the count."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": r} if isinstance(r, str) else r, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_corpus(out_dir: str, *, train_docs: int = 20_000, eval_docs: int = 1_000, seed: int = 0,
                 shards: int = 4, tasks: bool = True) -> dict[str, int]:
    """Write the default corpus as JSONL under `out_dir` so the real-file path is exercised:
    pretrain/train-0000N.jsonl, pretrain/eval-00000.jsonl and (with `tasks`) chat, reward and
    ppo splits from synthetic_tasks. Returns {relative path: record count}."""

    world = World()
    counts: dict[str, int] = {}
    docs = list(pretrain_docs(train_docs, seed, "train", world))
    for s in range(shards):
        rel = f"pretrain/train-{s:05d}.jsonl"
        counts[rel] = write_jsonl(os.path.join(out_dir, rel), docs[s::shards])
    counts["pretrain/eval-00000.jsonl"] = write_jsonl(
        os.path.join(out_dir, "pretrain/eval-00000.jsonl"), pretrain_docs(eval_docs, seed, "eval", world,
                                                                     exclude=set(docs)))
    if tasks:
        for split, n in (("train", max(train_docs // 4, 1)), ("eval", max(eval_docs // 4, 1))):
            for name, gen in (("chat", synthetic_tasks.chat_examples),
                              ("reward", synthetic_tasks.reward_examples),
                              ("ppo", synthetic_tasks.ppo_prompts)):
                rel = f"{name}/{split}.jsonl"
                counts[rel] = write_jsonl(os.path.join(out_dir, rel), gen(n, seed, split, world))
    return counts


def prepare_default_data(out_dir: str, *, train_docs: int = 20_000, eval_docs: int = 1_000,
                         vocab_size: int = 512, seed: int = 0, tasks: bool = True) -> dict[str, str]:
    """What `jaxllm data synth` + `jaxllm tokenizer train` do: the corpus as JSONL files and a
    tokenizer trained by reading those files back. Returns the globs and the tokenizer dir."""
    from jaxllm.data.sources import iter_texts
    from jaxllm.data.tokenizer import train_tokenizer

    write_corpus(out_dir, train_docs=train_docs, eval_docs=eval_docs, seed=seed, tasks=tasks)
    paths = {"train": os.path.join(out_dir, "pretrain", "train-*.jsonl"),
             "eval": os.path.join(out_dir, "pretrain", "eval-*.jsonl"),
             "tokenizer": os.path.join(out_dir, "tokenizer")}
    train_tokenizer(iter_texts([paths["train"]]), paths["tokenizer"], vocab_size, seed=seed)
    return paths
