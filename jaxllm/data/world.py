"""The fixed world every synthetic corpus describes: names, words, and the facts that hold
across splits (kingdoms and capitals, each person's tastes). Shared by the pretraining corpus
(synthetic.py) and the post-training tasks (synthetic_tasks.py) without either importing the
other.
"""
from __future__ import annotations

import random

# Each split draws from its own stream: (seed * 7919 + salt) seeds the generator.
SPLIT_SALT = {"train": 0, "eval": 1_000_003}


def split_rng(seed: int, split: str, salt: int = 0) -> random.Random:
    if split not in SPLIT_SALT:
        raise ValueError(f"split must be one of {list(SPLIT_SALT)}, got {split!r}")
    return random.Random(seed * 7919 + SPLIT_SALT[split] + salt)


NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jack", "Kai", "Lena",
         "Milo", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wren", "Zoe"]
ANIMALS = ["cat", "dog", "fox", "owl", "rabbit", "bear", "mouse", "duck", "frog", "horse",
           "goat", "otter", "hedgehog", "squirrel", "turtle", "lion"]
ADJECTIVES = ["small", "brave", "curious", "happy", "quiet", "clever", "kind", "sleepy", "tall",
              "gentle", "cheerful", "shy"]
PLACES = ["the forest", "a small village", "the big city", "a farm", "the mountains",
          "a house by the sea", "the garden", "a quiet town"]
ACTIVITIES = ["read books", "play in the park", "bake bread", "sing songs", "paint pictures",
              "climb trees", "swim in the lake", "look at the stars", "plant flowers"]
OBJECTS = ["a red ball", "a shiny key", "an old map", "a blue hat", "a tiny boat", "a golden coin",
           "a wooden box", "a lost kite", "a silver bell"]
FEELINGS = ["happy", "surprised", "excited", "proud", "thankful", "glad"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
FOODS = ["apples", "bread", "honey", "carrots", "cheese", "soup", "berries", "rice"]
SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vo", "zu", "bel", "dor", "fi", "gan", "sha", "tu",
             "wen", "qui", "nor"]


class World:
    """The fixed facts every split shares: kingdoms and capitals, and each person's tastes."""

    def __init__(self, world_seed: int = 1234, num_kingdoms: int = 16):
        rng = random.Random(world_seed)
        words: set[str] = set(NAMES)  # made-up words never collide with a person's name

        def word() -> str:
            while True:
                w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
                if w not in words:
                    words.add(w)
                    return w

        self.kingdoms = [word() for _ in range(num_kingdoms)]
        self.capital = {k: word() for k in self.kingdoms}
        self.export = {k: rng.choice(FOODS) for k in self.kingdoms}
        self.favorite_color = {n: rng.choice(COLORS) for n in NAMES}
        self.favorite_food = {n: rng.choice(FOODS) for n in NAMES}
        self.pet = {n: rng.choice(ANIMALS) for n in NAMES}
