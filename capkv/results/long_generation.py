"""Long generation under a bound, from the run folders: every continuation against the full
cache's continuation of the same prompt (``long_generation.csv``) and the mean over prompts per
run (``long_generation.md``).

A run of :class:`capkv.tasks.long_generation.LongGenerationTask` holds one row per prompt: the
tokens of its greedy continuation and what its cache held. Its reference is the full-cache run
of the same model, task, protocol, streaming settings (``chunk``, ``compress_every``) and
continuation length (preferably of the same variant); a continuation is compared only with the
reference's continuation of the same prompt tokens (``prompt_digest``):

- ``identical_tokens``: the tokens identical before the first divergence, and ``rouge_l``,
  ROUGE-L F1 on tokens (:mod:`capkv.analysis.continuations`);
- ``bound``: budget + max(chunk, compress_every), the most tokens a KV head may hold (blank for
  the full cache, or where a run does not stream both the prompt and the generation);
- ``peak_tokens_*``: the most tokens a KV head held at once (the layer holding most, the mean
  over layers); ``final_tokens_mean_layer``: tokens per KV head at the end; ``seconds``: the
  prefill and the generation of one prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from capkv.analysis.continuations import first_divergence, rouge_l
from capkv.results.format import markdown, with_identity_types
from capkv.results.metrics import run_reporting
from capkv.results.order import FULL, method_sort_key
from capkv.results.store import IDENTITY_KEYS, finished_rows, stored_config
from capkv.tasks.long_generation import BENCHMARK

TABLE = "long_generation"  # long_generation.csv, .md: folders with long-generation runs only
SETTINGS = ["new_tokens", "context_tokens", "chunk", "compress_every"]
MEASURES = [
    "identical_tokens",
    "rouge_l",
    "generated",
    "bound",
    "peak_tokens_max_layer",
    "peak_tokens_mean_layer",
    "final_tokens_mean_layer",
    "seconds",
]
COLUMNS = [*IDENTITY_KEYS, *SETTINGS, "prompt", *MEASURES]
SUMMARY_MEASURES = [
    "prompts",
    "identical_tokens",
    "identical_tokens_min",
    "rouge_l",
    "bound",
    "peak_tokens_max_layer",
    "peak_tokens_mean_layer",
    "final_tokens_mean_layer",
    "seconds",
]


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The settings a long-generation run was made with (its ``config.yaml``)."""
    config = stored_config(run_dir) or {"task": {}}
    return {
        "new_tokens": config["task"].get("new_tokens"),
        "context_tokens": config["task"].get("context_tokens"),
        "chunk": config.get("chunk"),
        "compress_every": config.get("compress_every"),
    }


def reference_key(metrics: dict[str, Any], settings: dict[str, Any]) -> tuple:
    """What a run and its full-cache reference share."""
    parts = (metrics["model"], metrics["task"], metrics["protocol"])
    return (*parts, settings["chunk"], settings["compress_every"], settings["new_tokens"])


def continuation_row(
    row: dict[str, Any], reference: dict[str, Any], budget: int | None, extra: int | None
) -> dict[str, Any]:
    """One continuation against the full cache's of the same prompt."""
    expected, tokens = reference["tokens"], row["tokens"]
    peaks, final = row["peak_tokens_per_layer"], row["final_tokens_per_layer"]
    return {
        "prompt": row["example_id"],
        "identical_tokens": first_divergence(expected, tokens),
        "rouge_l": rouge_l(expected, tokens),
        "generated": len(tokens),
        "bound": None if budget is None or extra is None else budget + extra,
        "peak_tokens_max_layer": max(peaks),
        "peak_tokens_mean_layer": sum(peaks) / len(peaks),
        "final_tokens_mean_layer": sum(final) / len(final),
        "seconds": row["prefill_seconds"] + row["decode_seconds"],
    }


def run_order(item: tuple[Path, dict[str, Any]]) -> tuple:
    """Model, task, protocol, then method (the full cache, CapKV, the baselines), then budget
    from the tightest (the full cache's none first)."""
    metrics = item[1]
    tokens = metrics["budget_tokens"]
    return (
        metrics["model"],
        metrics["task"],
        metrics["protocol"],
        method_sort_key(metrics["method"], metrics["variant"]),
        tokens is not None,
        tokens or 0,
        -(metrics["ratio"] or 0),
    )


def comparison_table(runs: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    """One row per long-generation run and prompt, each continuation against the full cache's
    (the full cache's own included); runs without a full-cache reference and prompts the
    reference lacks are left out.

    Parameters
    ----------
    runs : dict[Path, dict]
        ``metrics.json`` path -> its content (:func:`capkv.results.metrics.load_metrics`).

    Returns
    -------
    pandas.DataFrame
        :data:`COLUMNS`; empty when no run is of long generation.
    """
    generating = {}
    for path, metrics in runs.items():
        reporting = run_reporting(path, metrics)
        if reporting is not None and reporting.benchmark == BENCHMARK:
            generating[path] = (metrics, run_settings(path.parent), finished_rows(path.parent))
    references: dict[tuple, tuple[bool, dict[str, dict[str, Any]]]] = {}
    for metrics, settings, rows in generating.values():
        if metrics["method"] != FULL:
            continue
        key = reference_key(metrics, settings)
        candidate = (metrics["variant"] != settings_label(settings), _by_id(rows))
        if key not in references or candidate[0] < references[key][0]:
            references[key] = candidate
    records = []
    ordered = sorted(((p, m) for p, (m, _, _) in generating.items()), key=run_order)
    for path, metrics in ordered:
        _, settings, rows = generating[path]
        reference = references.get(reference_key(metrics, settings))
        if reference is None:
            continue
        identity = {key: metrics[key] for key in IDENTITY_KEYS}
        chunk, every = settings["chunk"], settings["compress_every"]
        extra = max(chunk, every) if chunk is not None and every is not None else None
        for row in rows:
            expected = reference[1].get(row["example_id"])
            if expected is None or expected["prompt_digest"] != row["prompt_digest"]:
                continue
            result = continuation_row(row, expected, metrics["budget_tokens"], extra)
            records.append({**identity, **settings, **result})
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    for column in [*SETTINGS, "bound"]:
        frame[column] = frame[column].astype("Int64")
    return with_identity_types(frame)


def settings_label(settings: dict[str, Any]) -> str:
    """The variant a run of these streaming settings gets without ``variant=``."""
    parts = []
    if settings["chunk"] is not None:
        parts.append(f"chunk{settings['chunk']}")
    if settings["compress_every"] is not None:
        parts.append(f"every{settings['compress_every']}")
    return "-".join(parts)


def _by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["example_id"]: row for row in rows}


def summary_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per run, the mean over prompts (identical tokens also their least), in the comparison's
    order."""
    if comparison.empty:
        return pd.DataFrame()
    keys = [*IDENTITY_KEYS, *SETTINGS]
    summary = comparison.groupby(keys, dropna=False, sort=False).agg(
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
    return summary.reset_index()


def budget_shown(label: str, tokens: Any) -> str:
    """``full`` for the full cache, else the tokens per KV head (the label for a ratio)."""
    if label == FULL:
        return FULL
    return label if pd.isna(tokens) else str(int(tokens))


def long_generation_markdown(comparison: pd.DataFrame) -> str:
    """The mean over prompts per run (:func:`summary_table`), with what the runs did."""
    if comparison.empty:
        return "(no long-generation runs yet)\n"
    summary = summary_table(comparison)
    shown = pd.DataFrame(
        {
            "model": summary["model"],
            "method": summary["method"],
            "variant": summary["variant"],
            "budget": [
                budget_shown(label, tokens)
                for label, tokens in zip(summary["budget"], summary["budget_tokens"], strict=True)
            ],
        }
    )
    for column in SUMMARY_MEASURES:
        values = summary[column]
        shown[column] = values.astype(object).where(values.notna(), "")
    prompts = ", ".join(sorted(comparison["prompt"].unique()))
    settings = comparison[SETTINGS].drop_duplicates().to_dict("records")
    described = "; ".join(
        f"{s['new_tokens']} tokens after an essay excerpt of at most {s['context_tokens']} tokens, "
        f"the prompt read in chunks of {s['chunk']} tokens and the cache compressed after each "
        f"chunk and every {s['compress_every']} generated tokens"
        for s in settings
    )
    caption = (
        "Long generation under a bound: greedy continuations (end-of-sequence tokens do not stop "
        f"them) of {comparison['prompt'].nunique()} prompt(s) ({prompts}), each an essay excerpt "
        f"and a request for a long continuation or summary: {described}; so no KV head holds "
        "more than `bound` = budget + max(chunk, compress_every) tokens (PyramidKV's layers "
        "hold their own budgets, which average the budget). Each continuation is compared with "
        "the full cache's continuation of the same prompt: `identical_tokens`, the tokens "
        "identical before the first divergence (mean over prompts, and the least), and "
        "`rouge_l`, ROUGE-L F1 on tokens. `peak_tokens_*`: the most tokens a KV head held at "
        "once (the layer holding most, and the mean over layers); `final_tokens_mean_layer`: "
        "tokens per KV head at the end; `seconds`: prefill and generation of one prompt. Every "
        "prompt's row: `long_generation.csv`; every continuation's tokens and text: the rows of "
        "the run folders.\n\n"
    )
    return caption + markdown(shown, {"rouge_l": 3, "seconds": 1})
