"""RULER's needle-in-a-haystack family: single, multi-key, multi-value and multi-query needles.

One task, :class:`NiahTask`; its variants are configurations (``conf/task/ruler/niah_*.yaml``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from capkv.tasks.common import MAGIC_NUMBER_INTRO, magic_key, magic_number
from capkv.tasks.haystack import build_haystack, insert_needles
from capkv.tasks.ruler.base import NOISE, Prompt, RulerTask, distinct

# RULER samples each needle's depth from 40 evenly spaced depths.
NEEDLE_DEPTHS = tuple(round(100 * i / 39) for i in range(40))

# RULER's NIAH intro, question and answer prefix, keyed by "one value asked for" (singular).
NIAH_TEXTS = {
    True: (
        MAGIC_NUMBER_INTRO,
        "What is the special magic number for {query} mentioned in the provided text?",
        "The special magic number for {query} mentioned in the provided text is",
    ),
    False: (
        "Some special magic numbers are hidden within the following text. Make sure to memorize "
        "it. I will quiz you about the numbers afterwards.",
        "What are all the special magic numbers for {query} mentioned in the provided text?",
        "The special magic numbers for {query} mentioned in the provided text are",
    ),
}


def _join_keys(keys: list[str]) -> str:
    """ "a", "a, and b", "a, b, and c" as RULER lists queried keys."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


@dataclass
class NiahTask(RulerTask):
    """RULER needle in a haystack with magic-number needles ("niah_single", by default).

    ``num_keys`` keys with ``num_values`` 7-digit values each are hidden as sentences "One of the
    special magic numbers for {key} is: {value}." at depths drawn from 40 evenly spaced ones;
    ``num_queries`` of the keys are asked for and all their values are the references. The
    defaults are RULER's niah_single_2 (``haystack="essay"``; niah_single_1 with ``"repeat"``);
    ``conf/task/ruler/niah_*.yaml`` hold the suite's variants.

    Parameters
    ----------
    num_keys : int
        Keys hidden; those not asked for are distractors (RULER's ``num_needle_k``).
    num_values : int
        Values per key (``num_needle_v``).
    num_queries : int
        Keys asked for at once (``num_needle_q``; at least that many keys are hidden).
    haystack : str
        ``"essay"``: Paul Graham's essays; ``"repeat"``: RULER's repeated noise sentences.
    """

    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    haystack: str = "essay"
    subtask: str = "niah_single"
    family: str = "NIAH"
    name: str = "ruler_niah_single"

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        keys = distinct(lambda: magic_key(rng), max(self.num_keys, self.num_queries))
        numbers = distinct(lambda: magic_number(rng), len(keys) * self.num_values)
        values = [numbers[i :: len(keys)] for i in range(len(keys))]
        needles = [
            f"One of the special magic numbers for {key} is: {value}."
            for key, key_values in zip(keys, values, strict=True)
            for value in key_values
        ]
        rng.shuffle(needles)
        depths = rng.sample(NEEDLE_DEPTHS, len(needles))
        queried = rng.sample(range(len(keys)), self.num_queries)
        haystack = build_haystack(tokenizer, size, None if self.haystack == "essay" else NOISE)
        body = insert_needles(tokenizer, haystack, needles, depths)
        query = _join_keys([keys[i] for i in queried])
        intro, question, prefix = NIAH_TEXTS[self.num_queries * self.num_values == 1]
        answers = [value for i in queried for value in values[i]]
        return Prompt(
            f"{intro}\n{body}",
            f"\n{question.format(query=query)}",
            prefix.format(query=query),
            answers,
        )
