"""Long generation under a bound: greedy continuations of essay prompts, read by the runner as a
task whose every cell (method, budget) writes one row per prompt.

For a few prompts (the opening of an essay and a request for a long continuation or summary, in
the model's chat template), a cell generates a greedy continuation of exactly ``new_tokens``
tokens with its cache bounded throughout: the prompt read in chunks of the run's ``chunk``
tokens, the cache compressed after each chunk and every ``compress_every`` generated tokens
(:func:`capkv.engine.bounded.generate_bounded`). Generation does not stop at an end-of-sequence
token, so every continuation has the same length. A row holds the continuation's tokens and
text and what the cache held; its comparison with the full cache's continuation of the same
prompt (the full cache is a cell of the same sweep) is made by the results layer
(:mod:`capkv.results.long_generation`), so a row's ``scores`` are empty.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from capkv.engine.bounded import generate_bounded
from capkv.engine.budget import Budget
from capkv.engine.method import EvictionMethod
from capkv.engine.streaming import StreamRecord, StreamSettings
from capkv.tasks.base import Example, Reporting
from capkv.tasks.haystack import build_haystack, essay_files
from capkv.tasks.prompting import tokenize_prompt

BENCHMARK = "long_generation"  # its runs have their own table (capkv.results.long_generation)
HEADLINE = "identical_tokens"  # made against the full cache's rows by the results layer

# What each prompt asks for after its essay excerpt; prompts alternate between the two.
REQUESTS = {
    "continue": "Continue this essay in the same style and voice. Write at least 800 more words.",
    "summary": "Summarize this essay in detail, point by point. Write at least 800 words.",
}


def whole_number(name: str, value: Any) -> None:
    """Refuse ``task.<name>`` unless it is a positive whole number."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"task.{name}={value!r} is not a positive whole number; pass one, e.g. "
            f"task.{name}={LongGenerationTask.__dataclass_fields__[name].default}."
        )


@dataclass
class LongGenerationTask:
    """Greedy continuations of ``prompts`` essay prompts under the run's bound.

    Parameters
    ----------
    prompts : int
        Prompts, one per essay: the first essays (by file name) of at least ``context_tokens``
        tokens, the requests (:data:`REQUESTS`) alternating.
    context_tokens : int
        Tokens of each essay excerpt at most (cut back to its last sentence end).
    new_tokens : int
        Tokens every continuation generates (end-of-sequence tokens do not stop it).
    name : str
        The task's name (its results folder).
    """

    prompts: int = 2
    context_tokens: int = 1536
    new_tokens: int = 512
    name: str = "long_generation"
    generates: ClassVar[bool] = True  # evaluate generates: compress_every= applies

    def __post_init__(self) -> None:
        for name in ("prompts", "context_tokens", "new_tokens"):
            whole_number(name, getattr(self, name))

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """Continuations compared with the full cache's: the results layer gives them their
        own table."""
        return Reporting(BENCHMARK, HEADLINE)

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """One example per prompt: the excerpt as context, the request as question; the runner
        tokenises it (:func:`capkv.tasks.prompting.tokenize_prompt`) in the chat template where
        the tokenizer has one, else the text followed by a blank line."""
        templated = bool(getattr(tokenizer, "chat_template", None))
        for prompt_id, essay, kind, excerpt in essay_excerpts(
            tokenizer, self.prompts, self.context_tokens
        ):
            yield Example(
                example_id=prompt_id,
                context=excerpt,
                question=f"\n\n{REQUESTS[kind]}" + ("" if templated else "\n\n"),
                answers=[],
                max_new_tokens=self.new_tokens,
                use_chat_template=True,
                metadata={"essay": essay, "request": kind},
            )

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """Nothing: a continuation is scored against the full cache's (the results layer)."""
        return {}

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        example: Example,
        method: EvictionMethod,
        budget: Budget | None,
        stream: StreamSettings,
    ) -> tuple[dict[str, Any], StreamRecord]:
        """Generate ``new_tokens`` greedy tokens after one prompt under the bound; the row's
        fields (the tokens and text, what the cache held, the times) and what was kept."""
        ids = tokenize_prompt(tokenizer, example).full()
        generation = generate_bounded(model, ids, method, budget, stream, self.new_tokens)
        fields = {
            "prediction": tokenizer.decode(generation.tokens, skip_special_tokens=True),
            "scores": {},
            "tokens": generation.tokens,
            "prompt_digest": digest(ids),
            "prompt_tokens": ids.shape[1],
            "prefill_peak_tokens_per_layer": generation.prefill_peak_per_layer,
            "final_tokens_per_layer": generation.final_per_layer,
            "compressions": generation.record.compressions,
            "prefill_seconds": round(generation.prefill_seconds, 3),
            "decode_seconds": round(generation.decode_seconds, 3),
            "prefill_cpu_seconds": round(generation.prefill_cpu_seconds, 3),
            "decode_cpu_seconds": round(generation.decode_cpu_seconds, 3),
        }
        return fields, generation.record


def digest(input_ids: torch.Tensor) -> str:
    """A short SHA-256 of a prompt's token ids (1, T): continuations of prompts made otherwise
    (another tokenizer or request) are never compared."""
    return hashlib.sha256(json.dumps(input_ids[0].tolist()).encode()).hexdigest()[:16]


def essay_excerpts(
    tokenizer: Any, count: int, context_tokens: int
) -> list[tuple[str, str, str, str]]:
    """(prompt id, essay, request kind, excerpt) of ``count`` prompts from the first essays (by
    file name) of at least ``context_tokens`` tokens: each essay's opening, cut back to its last
    sentence end within ``context_tokens`` tokens; the requests (:data:`REQUESTS`) alternate."""
    excerpts = []
    kinds = list(REQUESTS)
    for path in essay_files():
        if len(excerpts) == count:
            break
        text = path.read_text(encoding="utf-8").strip()
        tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(tokens) < context_tokens:
            continue
        haystack = build_haystack(tokenizer, context_tokens, text=text)
        end = haystack.boundaries[-1] or len(haystack)
        excerpt = tokenizer.decode(haystack.ids[:end], clean_up_tokenization_spaces=False)
        kind = kinds[len(excerpts) % len(kinds)]
        excerpts.append((f"{path.stem}-{kind}", path.stem, kind, excerpt))
    if len(excerpts) < count:
        raise ValueError(
            f"Only {len(excerpts)} essays hold at least {context_tokens} tokens, so "
            f"task.prompts={count} prompts cannot be made; pass fewer task.prompts or fewer "
            "task.context_tokens."
        )
    return excerpts
