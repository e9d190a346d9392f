"""Deterministic prompt sets for benchmarks and tests (no data set downloads)."""

from __future__ import annotations

import random

_TOPICS = [
    "the water cycle",
    "how a CPU cache works",
    "the history of the printing press",
    "photosynthesis",
    "why the sky is blue",
    "how vaccines train the immune system",
    "the rules of chess",
    "compound interest",
    "plate tectonics",
    "how a bicycle stays upright",
    "the French Revolution",
    "black holes",
    "how bread rises",
    "the TCP handshake",
    "coral reefs",
    "how to learn a language",
]
_ASKS = [
    "Explain {t} to a curious twelve-year-old.",
    "Write a short paragraph about {t}.",
    "Give me three surprising facts about {t}.",
    "What are common misconceptions about {t}?",
    "Summarize {t} in plain words, then give an example.",
]


def chat_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        ask = _ASKS[(i // len(_TOPICS) + rng.randrange(len(_ASKS))) % len(_ASKS)]
        out.append([{"role": "user", "content": ask.format(t=topic)}])
    return out
