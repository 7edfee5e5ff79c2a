"""RULER's variable tracking family (multi-hop tracing): follow chains of assignments."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from capkv.tasks.common import distinct
from capkv.tasks.haystack import build_haystack, insert_needles
from capkv.tasks.ruler.base import NOISE, Prompt, RulerTask

# Noise tokens of the solved variable-tracking example that precedes the task (RULER's one-shot).
VT_DEMO_TOKENS = 128


def _variable_chains(
    rng: random.Random, num_chains: int, num_hops: int, name_length: int
) -> tuple[list[list[str]], list[str]]:
    """Variable names per chain and each chain's value (RULER's ``generate_chains``)."""
    names = distinct(
        lambda: "".join(rng.choices(string.ascii_uppercase, k=name_length)),
        num_chains * (num_hops + 1),
    )
    chains = [names[i::num_chains] for i in range(num_chains)]
    values = distinct(lambda: str(rng.randint(10000, 99999)), num_chains)
    return chains, values


def _chain_statements(chain: list[str], value: str) -> list[str]:
    """``VAR A = 12345``, ``VAR B = VAR A``, ... in assignment order."""
    return [f"VAR {chain[0]} = {value}"] + [
        f"VAR {after} = VAR {before}" for before, after in zip(chain[:-1], chain[1:], strict=True)
    ]


@dataclass
class VariableTrackingTask(RulerTask):
    """RULER variable tracking ("vt"): follow chains of assignments hidden in a haystack.

    ``num_chains`` chains ``VAR A = 12345``, ``VAR B = VAR A``, ... (``num_hops`` hops each) are
    inserted in order at random sentence ends; the question asks for every variable assigned the
    first chain's value. As in RULER, a short solved example (3-letter names, noise haystack)
    precedes the task.

    Parameters
    ----------
    num_chains : int
        Chains inserted; all but the first are distractors.
    num_hops : int
        Assignments after the first in each chain (the answer has ``num_hops + 1`` names).
    haystack : str
        ``"essay"`` (RULER's vt config) or ``"repeat"`` (noise sentences).
    """

    num_chains: int = 1
    num_hops: int = 4
    haystack: str = "essay"
    max_new_tokens: int = 30
    subtask: str = "vt"
    family: str = "Variable tracking"
    name: str = "ruler_vt"

    def _solved(
        self, tokenizer: Any, rng: random.Random, size: int, text: str | None, name_length: int
    ) -> Prompt:
        chains, values = _variable_chains(rng, self.num_chains, self.num_hops, name_length)
        statements, depths = [], []
        for chain, value in zip(chains, values, strict=True):
            statements += _chain_statements(chain, value)
            depths += sorted(rng.uniform(0, 100) for _ in chain)
        haystack = build_haystack(tokenizer, size, text)
        intro = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text."
        )
        body = insert_needles(tokenizer, haystack, statements, depths)
        question = f"Question: Find all variables that are assigned the value {values[0]} in the "
        question += "text above."
        prefix = "Answer: According to the chain(s) of variable assignment in the text above, "
        prefix += f"{self.num_hops + 1} variables are assigned the value {values[0]}, they are:"
        return Prompt(f"{intro}\n\n{body}", f"\n{question}", prefix, chains[0])

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        demo = self._solved(tokenizer, rng, VT_DEMO_TOKENS, NOISE, name_length=3)
        solved = f"{demo.context}{demo.question} {demo.answer_prefix} {' '.join(demo.answers)}"
        text = None if self.haystack == "essay" else NOISE
        task = self._solved(tokenizer, rng, size, text, name_length=5)
        return task._replace(context=f"{solved}\n\n{task.context}")
