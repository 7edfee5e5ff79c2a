"""Long-text perplexity under a bounded cache: Paul Graham's essays read in chunks.

StreamingLLM's language-modelling test (Xiao et al. 2023, arXiv 2309.17453, section 4.1): a
long text is read a chunk at a time, every layer's cache compressed back to the bound after each
chunk (:func:`capkv.engine.streaming.read_text`), and every next token is scored from what the cache
holds of the tokens before it. It needs no task data: the texts are the essays of the needle
task (:mod:`capkv.tasks.haystack`), each starting at the first word of a different essay and
running on through the following ones. Perplexity is lower-is-better and unbounded, so its runs
get their own table and figure (:mod:`capkv.results.perplexity`, :mod:`capkv.figures.perplexity`).

Beside perplexity, each text's row records the log-det capacity fraction every compression
kept of the cache it compressed (:meth:`capkv.analysis.diagnostics.CapacityProbe.on_compression`, averaged
over compressions and layers): what CapKV's objective says of every method's kept sets.

Tokens keep their original positions, so a text stops at the model's position limit (8192 for
SmolLM2). The chunk is the run's ``chunk=`` key; without it, :data:`DEFAULT_CHUNK`. Nothing is
generated, so ``compress_every`` does not apply and the protocol changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel

from capkv.analysis.diagnostics import CapacityProbe
from capkv.engine.budget import Budget
from capkv.engine.compression import CompressionRecord
from capkv.engine.method import EvictionMethod
from capkv.engine.streaming import StreamSettings, read_text
from capkv.tasks.base import Example, Reporting
from capkv.tasks.haystack import build_haystack, essay_files, essays_from
from capkv.tasks.prompting import tokenize_prompt

BENCHMARK = "perplexity"  # the Reporting benchmark of a reading task scored by perplexity
HEADLINE = "perplexity"
DEFAULT_CHUNK = 512  # tokens per forward when the run gives no chunk=
CHARS_PER_TOKEN = 8  # essay characters taken per token wanted: English runs about 4 per token


@dataclass
class PerplexityTask:
    """Perplexity of ``num_texts`` essay texts of ``length`` tokens each, read under the bound.

    Parameters
    ----------
    length : int, optional
        Tokens per text, the first one included (it is read, not scored); None: the model's
        position limit (``max_position_embeddings``).
    num_texts : int
        Texts read; text ``i`` starts at essay ``i * E // num_texts`` of the ``E`` essays (in file
        order), so they start apart and overlap little. More texts narrow the interval.
    bucket : int
        Token positions per bucket of the per-position perplexity (the figure's x axis).
    name : str
        Results directory name.

    Notes
    -----
    Each row holds one text's NLL sum and scored tokens (``T - 1`` of a ``T``-token text),
    overall and per bucket, and its scores: ``perplexity`` (``exp`` of the mean NLL per token)
    and ``perplexity <start>-<end>`` per bucket of positions (:func:`text_fields`).
    """

    length: int | None = None
    num_texts: int = 3
    bucket: int = 1024
    name: str = "perplexity"

    def __post_init__(self) -> None:
        if self.length is not None and self.length < 2:
            raise ValueError(
                f"task.length={self.length} leaves no token to score; pass at least 2 tokens, "
                "or task.length=null for the model's position limit."
            )
        if self.num_texts < 1:
            raise ValueError(f"task.num_texts={self.num_texts} reads nothing; pass at least 1.")
        if self.bucket < 1:
            raise ValueError(
                f"task.bucket={self.bucket} is not a number of token positions; pass a positive "
                "one, e.g. task.bucket=1024."
            )

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """Perplexity, lower is better: the tables give it its own table."""
        return Reporting(BENCHMARK, HEADLINE)

    def shares_contexts(self) -> bool:
        """False: each text is read once, with no question."""
        return False

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """The texts, ``length`` tokens each as the runner tokenises them (special tokens such
        as a BOS included); ``max_prompt_tokens`` is the model's position limit (a reading
        task's, :func:`capkv.harness.runner.text_limit`)."""
        length = max_prompt_tokens if self.length is None else self.length
        if length > max_prompt_tokens:
            raise ValueError(
                f"task.length={length} is longer than the model's {max_prompt_tokens} positions "
                f"(tokens keep their positions); pass task.length={max_prompt_tokens} or less, "
                "or task.length=null for the model's limit."
            )
        files = essay_files()
        if self.num_texts > len(files):
            raise ValueError(
                f"task.num_texts={self.num_texts} is more than the {len(files)} essays a text "
                f"can start at; pass task.num_texts={len(files)} or less."
            )
        special = len(tokenizer("", add_special_tokens=True)["input_ids"])
        for i in range(self.num_texts):
            first = i * len(files) // self.num_texts
            source = essays_from(first, CHARS_PER_TOKEN * length)
            ids = build_haystack(tokenizer, length - special, text=source).ids
            yield Example(
                example_id=f"{files[first].stem}-{length}",
                context=tokenizer.decode(ids, clean_up_tokenization_spaces=False),
                question="",
                answers=[],
                max_new_tokens=0,
                use_chat_template=False,
                metadata={"first_essay": files[first].stem, "length": length},
            )

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        example: Example,
        method: EvictionMethod,
        budget: Budget | None,
        stream: StreamSettings,
    ) -> tuple[dict[str, Any], CompressionRecord]:
        """Read one text in chunks of ``stream.chunk`` (else :data:`DEFAULT_CHUNK`) tokens under
        the bound; its row fields (:func:`text_fields`) and what was kept."""
        if stream.compress_every is not None:
            raise ValueError(
                f"compress_every={stream.compress_every} bounds generation, and task=perplexity "
                "generates nothing; drop compress_every (chunk= sets how the text is read)."
            )
        ids = tokenize_prompt(tokenizer, example).context_ids  # the text; no question
        probe = CapacityProbe(n_cells=1) if budget is not None and method.evicts else None
        nll, record = read_text(model, ids, method, budget, stream.chunk or DEFAULT_CHUNK, probe)
        fields = text_fields(nll.tolist(), self.bucket)
        if probe is not None:  # what CapKV's objective says of the kept sets, beside perplexity
            fields["diagnostics"] = {"capacity_fraction": probe.mean(0)}
        return fields, record


def bucket_label(start: int, end: int) -> str:
    """``0-1024``: the token positions ``start`` to ``end - 1`` of a text."""
    return f"{start}-{end}"


def text_fields(nll: Sequence[float], bucket: int) -> dict[str, Any]:
    """The row fields of one text: its scores and NLL sums, overall and per position bucket.

    Parameters
    ----------
    nll : sequence of float
        NLL (nats) of the tokens at positions ``1 .. T-1`` of a ``T``-token text (position 0,
        the first token, has nothing before it to be predicted from).
    bucket : int
        Positions per bucket: bucket ``k`` scores the tokens at positions ``k * bucket`` to
        ``(k + 1) * bucket - 1`` (with ``bucket=1``, position 0's bucket scores nothing and is
        left out).

    Returns
    -------
    dict
        ``scores`` (``perplexity`` of the whole text first, then ``perplexity <start>-<end>``
        per bucket), ``nll_sum`` and ``scored_tokens``, and per bucket ``bucket_starts``,
        ``bucket_ends``, ``bucket_nll_sums`` and ``bucket_tokens``.
    """
    values = [float(value) for value in nll]
    length = len(values) + 1
    starts = [start for start in range(0, length, bucket) if start + bucket > 1]  # scores a token
    ends = [min(start + bucket, length) for start in starts]
    sums = [
        math.fsum(values[max(start, 1) - 1 : end - 1])
        for start, end in zip(starts, ends, strict=True)
    ]
    counts = [end - max(start, 1) for start, end in zip(starts, ends, strict=True)]
    total = math.fsum(values)
    scores = {HEADLINE: perplexity(total, len(values))}
    for start, end, nll_sum, count in zip(starts, ends, sums, counts, strict=True):
        scores[f"{HEADLINE} {bucket_label(start, end)}"] = perplexity(nll_sum, count)
    return {
        "scores": scores,
        "nll_sum": total,
        "scored_tokens": len(values),
        "bucket_starts": starts,
        "bucket_ends": ends,
        "bucket_nll_sums": sums,
        "bucket_tokens": counts,
    }


def perplexity(nll_sum: float, tokens: int) -> float:
    """``exp`` of the mean NLL per token (NaN for no token)."""
    return math.exp(nll_sum / tokens) if tokens else math.nan


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``metrics.json`` holds for a perplexity run: every score pooled over the texts
    (``exp`` of the summed NLL over the summed tokens, overall and per bucket), not x 100.

    The texts of a run share their length and buckets (its settings are fixed per folder).
    """
    nll_sum = math.fsum(row["nll_sum"] for row in rows)
    scores = {HEADLINE: perplexity(nll_sum, sum(row["scored_tokens"] for row in rows))}
    first = rows[0]
    for k, (start, end) in enumerate(
        zip(first["bucket_starts"], first["bucket_ends"], strict=True)
    ):
        bucket_sum = math.fsum(row["bucket_nll_sums"][k] for row in rows)
        tokens = sum(row["bucket_tokens"][k] for row in rows)
        scores[f"{HEADLINE} {bucket_label(start, end)}"] = perplexity(bucket_sum, tokens)
    return {"n_examples": len(rows), "scores": scores, "subtasks": {}}
