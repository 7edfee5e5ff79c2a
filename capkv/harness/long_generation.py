"""Long generation under a bound: greedy continuations compared with the full cache's.

For a few prompts (an essay excerpt and a request for a long continuation or summary), every
method and budget generates a greedy continuation of a fixed number of tokens with the cache
bounded throughout (:mod:`capkv.engine.streaming`: the prompt read in chunks of ``chunk`` tokens, the
cache compressed after each chunk and every ``compress_every`` generated tokens). Each
continuation is compared with the full cache's continuation of the same prompt
(:mod:`capkv.analysis.continuations`): the tokens identical before the first divergence, and ROUGE-L on
tokens. Generation does not stop at an end-of-sequence token, so every continuation has the same
length.

Every finished (prompt, method, budget) cell is appended to a rows file at once; a rerun skips
the cells already there, and a folder holding rows of other settings is refused. The tables are
rebuilt from the rows alone. ``scripts/long_generation.py`` is the command line.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import DynamicCache, PreTrainedModel

from capkv.analysis.continuations import first_divergence, rouge_l
from capkv.engine.budget import Budget
from capkv.engine.decoding import greedy_generate
from capkv.engine.method import EvictionMethod
from capkv.engine.streaming import StreamRecord, StreamSettings, check_positions, streamed
from capkv.results.format import markdown
from capkv.results.order import method_sort_key
from capkv.results.store import ExampleLog, read_rows
from capkv.storage.files import write_atomically
from capkv.tasks.haystack import build_haystack, essay_files

ROWS = "long_generation_rows.jsonl"
SETTINGS = "long_generation_settings.json"
TABLE = "long_generation"  # .csv: every cell; .md: the mean over prompts
FULL = "full"  # the reference method

# What each prompt asks for after its essay excerpt; prompts alternate between the two.
REQUESTS = {
    "continue": "Continue this essay in the same style and voice. Write at least 800 more words.",
    "summary": "Summarize this essay in detail, point by point. Write at least 800 words.",
}


@dataclass(frozen=True)
class LongGenerationSettings:
    """What one results folder of the comparison holds (rows of other settings are refused).

    Parameters
    ----------
    model : str
        The model's conf/model name (labels and the figure's file name).
    context_tokens : int
        Tokens of each essay excerpt at most (cut back to a sentence end).
    new_tokens : int
        Tokens every continuation generates (end-of-sequence tokens do not stop it).
    chunk : int
        Prompt tokens per forward, each followed by a compression.
    compress_every : int
        Generated tokens between compressions.
    """

    model: str
    context_tokens: int = 1536
    new_tokens: int = 512
    chunk: int = 512
    compress_every: int = 64

    def __post_init__(self) -> None:
        for name in ("context_tokens", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{name} must be a positive whole number of tokens, got {value!r}."
                )
        StreamSettings(self.chunk, self.compress_every)  # refuses a bad chunk or compress_every

    @property
    def stream(self) -> StreamSettings:
        return StreamSettings(chunk=self.chunk, compress_every=self.compress_every)


@dataclass(frozen=True)
class ContinuationPrompt:
    """One prompt: an essay excerpt and a request, as token ids (1, T)."""

    prompt_id: str
    essay: str
    request: str
    input_ids: torch.Tensor

    @property
    def digest(self) -> str:
        """A short SHA-256 of the token ids: rows of a prompt made otherwise are told apart."""
        return hashlib.sha256(json.dumps(self.input_ids[0].tolist()).encode()).hexdigest()[:16]


@dataclass
class BoundedGeneration:
    """A greedy continuation under a bound, what the cache held and how long it took.

    Times are wall-clock seconds and the process's CPU seconds (which other processes on a
    shared machine do not inflate; with one torch thread they equal the wall time of a quiet
    machine) of the prefill and of the generation.
    """

    tokens: list[int]
    record: StreamRecord  # what was kept, and the peak over the whole pass
    prefill_peak_per_layer: list[int]  # the peak while the prompt was read
    final_per_layer: list[int]  # tokens per KV head in each layer's cache at the end
    prefill_seconds: float
    decode_seconds: float
    prefill_cpu_seconds: float
    decode_cpu_seconds: float


def essay_prompts(tokenizer: Any, count: int, context_tokens: int) -> list[ContinuationPrompt]:
    """``count`` prompts from the first essays (by file name) of at least ``context_tokens``
    tokens: each essay's opening, cut back to its last sentence end within ``context_tokens``
    tokens, then a request (:data:`REQUESTS`, alternating), in the model's chat template where
    the tokenizer has one."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"prompts must be a positive whole number, got {count!r}.")
    prompts: list[ContinuationPrompt] = []
    kinds = list(REQUESTS)
    for path in essay_files():
        if len(prompts) == count:
            break
        text = path.read_text(encoding="utf-8").strip()
        if len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) < (
            context_tokens
        ):
            continue
        haystack = build_haystack(tokenizer, context_tokens, text=text)
        end = haystack.boundaries[-1] or len(haystack)
        excerpt = tokenizer.decode(haystack.ids[:end], clean_up_tokenization_spaces=False)
        kind = kinds[len(prompts) % len(kinds)]
        prompts.append(
            ContinuationPrompt(
                f"{path.stem}-{kind}", path.stem, kind, prompt_ids(tokenizer, excerpt, kind)
            )
        )
    if len(prompts) < count:
        raise ValueError(
            f"Only {len(prompts)} essays hold at least {context_tokens} tokens, so {count} prompts "
            "cannot be made; ask for fewer prompts or fewer context tokens."
        )
    return prompts


def prompt_ids(tokenizer: Any, excerpt: str, kind: str) -> torch.Tensor:
    """Token ids (1, T) of an excerpt followed by the request ``kind``."""
    content = f"{excerpt}\n\n{REQUESTS[kind]}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(content + "\n\n")["input_ids"]
    return torch.tensor([ids])


def generate_bounded(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    method: EvictionMethod,
    budget: Budget | None,
    settings: StreamSettings,
    new_tokens: int,
) -> BoundedGeneration:
    """Read ``input_ids`` (1, T) and generate exactly ``new_tokens`` greedy tokens inside
    :func:`capkv.engine.streaming.streamed` (no stop token), timing the two phases apart.

    ``budget`` None for the full cache, which reads the prompt in the same chunks.
    """
    check_positions(model, input_ids.shape[1], new_tokens)
    cache = DynamicCache()
    with streamed(model, method, budget, settings=settings) as streamer:
        start, start_cpu = time.perf_counter(), time.process_time()
        last_logits = streamer.prefill(input_ids, cache)
        middle, middle_cpu = time.perf_counter(), time.process_time()
        prefill_peak = list(streamer.record.peak_per_layer)
        tokens = greedy_generate(
            model, cache, input_ids.shape[1], new_tokens, (), next_token_logits=last_logits
        )
        end, end_cpu = time.perf_counter(), time.process_time()
    return BoundedGeneration(
        tokens=tokens,
        record=streamer.record,
        prefill_peak_per_layer=prefill_peak,
        final_per_layer=[layer.keys.shape[2] for layer in cache.layers],
        prefill_seconds=middle - start,
        decode_seconds=end - middle,
        prefill_cpu_seconds=middle_cpu - start_cpu,
        decode_cpu_seconds=end_cpu - middle_cpu,
    )


def cell_id(prompt_id: str, method: str, budget: int | None) -> str:
    """The key of one row: ``essay-kind/method/budget512`` (``full`` for the full cache)."""
    return f"{prompt_id}/{method}/{FULL if budget is None else f'budget{budget}'}"


def check_settings(folder: Path, settings: LongGenerationSettings) -> None:
    """Write ``settings`` beside the rows, or refuse a folder holding rows of other settings."""
    path = folder / SETTINGS
    wanted = asdict(settings)
    if path.exists():
        stored = json.loads(path.read_text())
        differing = [key for key in wanted if stored.get(key) != wanted[key]]
        if differing:
            raise ValueError(
                f"{folder} holds long-generation rows of other settings (differs in "
                f"{', '.join(differing)}); pass --results with another folder, or delete "
                f"{path} and {folder / ROWS} to start again."
            )
        return
    write_atomically(path, json.dumps(wanted, indent=2) + "\n")


def run_comparison(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[ContinuationPrompt],
    methods: dict[str, EvictionMethod],
    budgets: list[int],
    settings: LongGenerationSettings,
    folder: Path,
    progress: Callable[[list], Iterable] | None = None,
) -> list[dict[str, Any]]:
    """Generate every (prompt, method, budget) cell not yet in ``folder``'s rows (the full
    cache, ``methods["full"]``, once per prompt and first), appending each row as it finishes;
    return all rows.

    A row made with other method settings or from other prompt tokens than now is refused
    (:func:`check_rows`), so a folder never mixes them.
    """
    if FULL not in methods:
        raise ValueError("methods must include the full cache, the reference of every method.")
    check_settings(folder, settings)
    rows = read_rows(folder / ROWS)
    check_rows(rows, prompts, methods, folder / ROWS)
    done = {row["example_id"] for row in rows}
    cells = [
        (prompt, name, budget)
        for prompt in prompts
        for name, budget in [(FULL, None)]
        + [(name, b) for name in methods if name != FULL for b in budgets]
        if cell_id(prompt.prompt_id, name, budget) not in done
    ]
    log = ExampleLog(folder / ROWS, rows)
    try:
        for prompt, name, budget in progress(cells) if progress else cells:
            generation = generate_bounded(
                model,
                prompt.input_ids,
                methods[name],
                None if budget is None else Budget(tokens=budget),
                settings.stream,
                settings.new_tokens,
            )
            row = {
                "example_id": cell_id(prompt.prompt_id, name, budget),
                "prompt": prompt.prompt_id,
                "essay": prompt.essay,
                "request": prompt.request,
                "prompt_digest": prompt.digest,
                "method": name,
                "method_settings": repr(methods[name]),
                "budget_tokens": budget,
                "prompt_tokens": prompt.input_ids.shape[1],
                "tokens": generation.tokens,
                "text": tokenizer.decode(generation.tokens, skip_special_tokens=True),
                "peak_tokens_per_layer": generation.record.peak_per_layer,
                "final_tokens_per_layer": generation.final_per_layer,
                "compressions": generation.record.compressions,
                "prefill_seconds": round(generation.prefill_seconds, 3),
                "decode_seconds": round(generation.decode_seconds, 3),
            }
            log.append(row)
            rows.append(row)
    finally:
        log.close()
    return rows


def check_rows(
    rows: list[dict[str, Any]],
    prompts: list[ContinuationPrompt],
    methods: dict[str, EvictionMethod],
    path: Path,
) -> None:
    """Refuse rows of a method made with other settings (its repr) or of a prompt made from
    other tokens (its digest) than ``methods`` and ``prompts`` hold now."""
    digests = {prompt.prompt_id: prompt.digest for prompt in prompts}
    for row in rows:
        method = methods.get(row["method"])
        if method is not None and row["method_settings"] != repr(method):
            raise ValueError(
                f"{path} holds {row['method']} rows made with {row['method_settings']}, not "
                f"{method!r}; pass --results with another folder."
            )
        if digests.get(row["prompt"], row["prompt_digest"]) != row["prompt_digest"]:
            raise ValueError(
                f"{path} holds rows of prompt {row['prompt']} made from other tokens (another "
                "tokenizer or request); pass --results with another folder."
            )


def comparison_table(rows: list[dict[str, Any]], settings: LongGenerationSettings) -> pd.DataFrame:
    """One row per (prompt, method, budget), the full cache's included, each continuation
    against the full cache's of its prompt; prompts without a full-cache row are left out."""
    reference = {row["prompt"]: row["tokens"] for row in rows if row["method"] == FULL}
    bound_extra = max(settings.chunk, settings.compress_every)
    table = []
    for row in rows:
        if row["prompt"] not in reference:
            continue
        expected, tokens = reference[row["prompt"]], row["tokens"]
        peaks = row["peak_tokens_per_layer"]
        budget = row["budget_tokens"]
        table.append(
            {
                "prompt": row["prompt"],
                "method": row["method"],
                "budget": budget,
                "identical_tokens": first_divergence(expected, tokens),
                "rouge_l": rouge_l(expected, tokens),
                "generated": len(tokens),
                "bound": None if budget is None else budget + bound_extra,
                "peak_tokens_max_layer": max(peaks),
                "peak_tokens_mean_layer": sum(peaks) / len(peaks),
                "final_tokens_mean_layer": sum(row["final_tokens_per_layer"])
                / len(row["final_tokens_per_layer"]),
                "seconds": row["prefill_seconds"] + row["decode_seconds"],
            }
        )
    frame = pd.DataFrame(table)
    if frame.empty:
        return frame
    frame["budget"] = frame["budget"].astype("Int64")
    frame["bound"] = frame["bound"].astype("Int64")
    return in_method_order(frame, ["prompt"])


def summary_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per method and budget, the mean over prompts (identical tokens also their least)."""
    if comparison.empty:
        return comparison
    summary = (
        comparison.groupby(["method", "budget"], dropna=False, sort=False)
        .agg(
            prompts=("prompt", "nunique"),
            identical_tokens=("identical_tokens", "mean"),
            identical_tokens_min=("identical_tokens", "min"),
            rouge_l=("rouge_l", "mean"),
            bound=("bound", "first"),
            peak_tokens_max_layer=("peak_tokens_max_layer", "max"),
            peak_tokens_mean_layer=("peak_tokens_mean_layer", "mean"),
            final_tokens_mean_layer=("final_tokens_mean_layer", "mean"),
            seconds=("seconds", "mean"),
        )
        .reset_index()
    )
    return in_method_order(summary, [])


def in_method_order(table: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    """``table`` sorted by the ``first`` columns, then method (the full cache, CapKV, the
    baselines: the figures' order), then budget."""
    rank = table["method"].map(lambda method: method_sort_key(method)[0])
    ordered = table.assign(method_rank=rank).sort_values(
        [*first, "method_rank", "method", "budget"], na_position="first", kind="stable"
    )
    return ordered.drop(columns="method_rank").reset_index(drop=True)


def write_tables(
    rows: list[dict[str, Any]], settings: LongGenerationSettings, folder: Path, command: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``long_generation.csv`` (every cell) and ``long_generation.md`` (the mean over prompts,
    with the settings and the command that wrote them); returns both tables."""
    comparison = comparison_table(rows, settings)
    summary = summary_table(comparison)
    write_atomically(folder / f"{TABLE}.csv", comparison.to_csv(index=False, float_format="%.4f"))
    prompts = sorted(comparison["prompt"].unique()) if not comparison.empty else []
    header = (
        f"# Long generation under a bound ({settings.model})\n\n"
        f"Written by `{command}` from `{ROWS}` (every continuation's tokens and text); "
        f"`{TABLE}.csv` has every prompt.\n\n"
        f"Greedy continuations of {settings.new_tokens} tokens (end-of-sequence tokens do not "
        f"stop them) of {len(prompts)} prompt(s) ({', '.join(prompts)}), each an essay excerpt "
        f"of at most {settings.context_tokens} tokens and a request for a long continuation or "
        f"summary; the prompt read in chunks of {settings.chunk} tokens and the cache "
        f"compressed after each chunk and every {settings.compress_every} generated tokens, so "
        "no KV head holds more than `bound` = budget + max(chunk, compress_every) tokens "
        "(PyramidKV's layers hold their own budgets, which average the budget). Each "
        "continuation is compared with the full cache's continuation of the same prompt: "
        "`identical_tokens`, the tokens identical before the first divergence (mean over "
        "prompts, and the least), and `rouge_l`, ROUGE-L F1 on tokens. `peak_tokens_*`: the "
        "most tokens a KV head held at once (the layer holding most, and the mean over "
        "layers); `final_tokens_mean_layer`: tokens per KV head at the end; `seconds`: prefill "
        "and generation of one prompt.\n\n"
    )
    digits = {"rouge_l": 3, "seconds": 1}
    write_atomically(folder / f"{TABLE}.md", header + markdown(displayed(summary), digits))
    return comparison, summary


def displayed(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its budget and bound as text: ``full`` and blank for the full cache."""
    if table.empty:
        return table
    return table.assign(
        budget=[FULL if pd.isna(b) else str(b) for b in table["budget"]],
        bound=["" if pd.isna(b) else str(b) for b in table["bound"]],
    )
