"""What the benchmarks share: text normalisation, RULER's magic keys and numbers and its intro line,
and fitting a prompt into a length limit.

The prompt-length limit has one rule, :func:`prompt_limit`: the tokens a prompt may take are the
positions of its window less the tokens left for the answer (and for the chat template, when the
prompt is counted without it). The runner applies it to the model's window (the limit every task
receives, and the check of every tokenised prompt); RULER applies it to its own sequence lengths.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any

from capkv.tasks.base import Example

# Key words in RULER's "adjective-noun" style (RULER draws them from the wonderwords lists).
_ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crooked", "curious", "dusty", "eager",
    "fancy", "fragile", "gentle", "gloomy", "grumpy", "hollow", "humble", "jittery", "jolly",
    "lazy", "lively", "lucky", "mellow", "nervous", "noisy", "odd", "polite", "proud", "quiet",
    "rapid", "rusty", "shiny", "silent", "sleepy", "steady", "stormy", "tidy", "vivid", "wary",
    "witty", "zealous",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "banjo", "beacon", "bicycle", "canyon", "carpet", "castle", "comet",
    "compass", "falcon", "garden", "glacier", "harbor", "hospital", "kettle", "lantern", "meadow",
    "mirror", "muffin", "orchard", "otter", "parrot", "pebble", "pillow", "puzzle", "quartz",
    "raven", "saddle", "shovel", "teapot", "thimble", "tractor", "trumpet", "tulip", "violin",
    "walrus", "wagon", "willow", "zeppelin",
)  # fmt: skip

# RULER's NIAH intro for one needle asked for (its niah_single template); without it SmolLM2-135M
# loses needles from 6k tokens on (3 of 5 found at 6k, 5 of 5 with it).
MAGIC_NUMBER_INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)


def magic_key(rng: random.Random) -> str:
    """A RULER-style key such as ``"jittery-hospital"``."""
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def magic_number(rng: random.Random, num_digits: int = 7) -> str:
    """A random number of exactly ``num_digits`` digits (RULER's needle values have 7)."""
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def distinct(draw: Callable[[], str], count: int) -> list[str]:
    """``count`` distinct results of ``draw()``, in the order first drawn."""
    items: dict[str, None] = {}
    while len(items) < count:
        items[draw()] = None
    return list(items)


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def prompt_limit(window: int, max_new_tokens: int, overhead: int = 0) -> int:
    """Tokens a prompt may take: ``window`` positions less ``max_new_tokens`` for the answer and
    ``overhead`` for what the count leaves out (the chat template).

    The one rule for every prompt-length limit: the model's (``capkv.harness.runner``) and RULER's
    sequence lengths.
    """
    return window - max_new_tokens - overhead


def prompt_tokens(tokenizer: Any, example: Example) -> int:
    """Tokens of the full prompt: chat template (when used and available) and answer prefix."""
    user = example.context + example.question
    if example.use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return len(tokenizer(text + example.answer_prefix, add_special_tokens=False)["input_ids"])
    return len(tokenizer(f"{user}{example.answer_prefix}")["input_ids"])


def check_prompt_fits(tokenizer: Any, example: Example, max_prompt_tokens: int) -> None:
    """Raise one clear error when a generated example's prompt is longer than the model allows.

    For tasks that generate their context to a length (``metadata["context_length"]``): the
    error names the largest length that fits.
    """
    length = example.metadata["context_length"]
    needed = prompt_tokens(tokenizer, example)
    if needed > max_prompt_tokens:
        largest = length - (needed - max_prompt_tokens)
        raise ValueError(
            f"context length {length} gives a {needed}-token prompt, more than the model limit "
            f"of {max_prompt_tokens} prompt tokens; pass task.context_lengths=[...] with lengths "
            f"up to about {largest}"
        )
