"""RULER's aggregation family, common words extraction ("cwe")."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from capkv.tasks.haystack import read_essays
from capkv.tasks.ruler.base import Prompt, RulerTask


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Distinct lowercase words of five letters or more in the essays, sorted.

    RULER draws its common words from the wonderwords noun, adjective and verb lists; the essays
    give a vocabulary of about 7,000 words without another dependency.
    """
    return tuple(sorted(set(re.findall(r"\b[a-z]{5,}\b", read_essays()))))


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


@dataclass
class CommonWordsTask(RulerTask):
    """RULER common words extraction ("cwe"): the ``num_cw`` most frequent words of a list.

    ``size`` distinct words are drawn; ``num_cw`` of them appear ``freq_cw`` times, the others
    ``freq_ucw`` times, shuffled into a numbered list. As in RULER, lengths under 4096 use 6 and 1
    repetitions, and a solved example (40 words, 10 and 3 repetitions; 20 words, 3 and 1 under
    4096) precedes the task.

    Parameters
    ----------
    freq_cw : int
        Repetitions of each common word.
    freq_ucw : int
        Repetitions of each uncommon word.
    num_cw : int
        Number of common words (the answer).
    """

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    max_new_tokens: int = 120
    subtask: str = "cwe"
    family: str = "Aggregation"
    name: str = "ruler_cwe"

    def size_limit(self) -> int:
        return len(essay_words())

    def _solved(
        self, rng: random.Random, num_words: int, freq_cw: int, freq_ucw: int
    ) -> tuple[str, list[str]]:
        words = rng.sample(essay_words(), num_words)
        common, uncommon = words[: self.num_cw], words[self.num_cw :]
        listing = common * freq_cw + uncommon * freq_ucw
        rng.shuffle(listing)
        intro = "Below is a numbered list of words. In these words, some appear more often than "
        intro += "others. Memorize the ones that appear most often."
        return f"{intro}\n{_numbered(listing)}", common

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        short = context_length < 4096
        demo_shape = (20, 3, 1) if short else (40, 10, 3)
        demo, demo_answers = self._solved(rng, *demo_shape)
        freqs = (6, 1) if short else (self.freq_cw, self.freq_ucw)
        context, answers = self._solved(rng, max(size, self.num_cw), *freqs)
        question = f"Question: What are the {self.num_cw} most common words in the above list?"
        prefix = f"Answer: The top {self.num_cw} words that appear most often in the list are:"
        solved = f"{demo}\n{question} {prefix} {_numbered(demo_answers)}"
        return Prompt(f"{solved}\n{context}", f"\n{question}", prefix, answers)
