"""RULER's aggregation family, frequent words extraction ("fwe")."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from capkv.tasks.common import distinct
from capkv.tasks.ruler.base import Prompt, RulerTask


def _zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin tail after ``terms`` terms)."""
    head = sum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2


@dataclass
class FrequentWordsTask(RulerTask):
    """RULER frequent words extraction ("fwe"): the three most frequent coded words.

    A vocabulary of random ``coded_wordlen``-letter words (``(length - max_new_tokens) // 50`` of
    them, at least 10, as in RULER) is ranked at random; the word of rank ``k`` appears
    ``int(size * k**-alpha / zeta(alpha))`` times (Zipf). Rank 1 is replaced by the noise "..."
    and ranks 2 to 4 are the answer.

    Parameters
    ----------
    alpha : float
        Zipf exponent (> 1); larger concentrates the counts on the top words.
    coded_wordlen : int
        Letters per coded word.
    """

    alpha: float = 2.0
    coded_wordlen: int = 6
    max_new_tokens: int = 50
    subtask: str = "fwe"
    family: str = "Aggregation"
    name: str = "ruler_fwe"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 1:
            raise ValueError(f"alpha must be > 1 for a Zipf distribution, got {self.alpha}")

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        vocab_size = max((context_length - self.max_new_tokens) // 50, 10)
        letters = string.ascii_lowercase
        vocab = distinct(lambda: "".join(rng.choices(letters, k=self.coded_wordlen)), vocab_size)
        vocab[0] = "..."
        norm = _zeta(self.alpha)
        words = [
            word
            for rank, word in enumerate(vocab, start=1)
            for _ in range(int(size * rank**-self.alpha / norm))
        ]
        rng.shuffle(words)
        intro = "Read the following coded text and track the frequency of each coded word. Find "
        intro += "the three most frequently appeared coded words."
        question = "Question: Do not provide any explanation. Please ignore the dots '....'. What "
        question += "are the three most frequently appeared words in the above coded text?"
        prefix = "Answer: According to the coded text above, the three most frequently appeared "
        prefix += "words are:"
        return Prompt(f"{intro} {' '.join(words)}", f"\n{question}", prefix, vocab[1:4])
