"""A small synthetic English-like corpus for the demo, generated from a seeded grammar (no download)."""

from __future__ import annotations

import random

_SUBJECTS = ["the cat", "a dog", "the old sailor", "my neighbour", "the young queen", "a small bird",
             "the farmer", "our teacher", "the river", "a tired horse", "the baker", "the wind"]
_VERBS = ["sees", "follows", "finds", "carries", "watches", "remembers", "paints", "greets", "crosses", "hears"]
_OBJECTS = ["the bridge", "a red apple", "the quiet garden", "an open door", "the long road", "a bright star",
            "the market", "a wooden boat", "the evening bell", "a letter", "the hill", "the harbour"]
_ADVERBS = ["slowly", "at dawn", "every morning", "without a word", "in the rain", "again", "with care", "today"]
_JOINS = ["and then", "while", "because", "so", "but later"]


def _clause(rng: random.Random) -> str:
    parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(_ADVERBS))
    return " ".join(parts)


def _sentence(rng: random.Random) -> str:
    text = _clause(rng)
    if rng.random() < 0.4:
        text += f" {rng.choice(_JOINS)} {_clause(rng)}"
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"])


def generate_corpus(num_chars: int = 200_000, seed: int = 0) -> str:
    """Seeded English-like text of about ``num_chars`` characters, in paragraphs."""
    rng = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < num_chars:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))
        lines.append(paragraph)
        size += len(paragraph) + 1
    return "\n".join(lines)
