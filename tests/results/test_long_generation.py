"""Long generation's tables from run folders alone: each continuation against the full cache's
of the same prompt and settings, the mean over prompts, and the runs kept out of the 0-100
tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from capkv import Budget
from capkv.results.metrics import write_metrics
from capkv.results.store import CONFIG, EXAMPLES, ExampleLog, identity_directory, run_identity
from capkv.results.tables import aggregate
from capkv.tasks.base import Reporting

FULL_TOKENS = {"a-continue": [1, 2, 3, 4, 5, 6], "b-summary": [7, 8, 9, 10, 11, 12]}


def write_run(
    results: Path,
    method: str,
    budget: Budget | None,
    tokens: dict[str, list[int]],
    new_tokens: int = 6,
    digests: dict[str, str] | None = None,
) -> None:
    """A long-generation run as the runner writes it: config, one row per prompt, metrics."""
    identity = run_identity("tiny", "long_generation", method, "chunk8-every2", budget, "qa")
    run_dir = identity_directory(results, identity)
    run_dir.mkdir(parents=True)
    task = {"_target_": "capkv.tasks.long_generation.LongGenerationTask", "prompts": 2}
    config = {"model": {}, "method": {}, "task": {**task, "new_tokens": new_tokens}}
    config |= {"chunk": 8, "compress_every": 2}
    (run_dir / CONFIG).write_text(yaml.safe_dump(config))
    peak = 12 if budget is None else budget.tokens + 8
    rows = [
        {
            "example_id": prompt,
            "scores": {},
            "prompt_tokens": 20,
            "kept_tokens_per_layer": [4, 4],
            "tokens": ids,
            "prompt_digest": (digests or {}).get(prompt, prompt),
            "peak_tokens_per_layer": [peak, peak - 2],
            "final_tokens_per_layer": [5, 7],
            "prefill_seconds": 1.0,
            "decode_seconds": 2.5,
        }
        for prompt, ids in tokens.items()
    ]
    log = ExampleLog(run_dir / EXAMPLES, [])
    for row in rows:
        log.append(row)
    log.close()
    write_metrics(run_dir, identity, rows, reporting=Reporting("long_generation", "x"))


def test_continuations_are_compared_with_the_full_cache_of_the_same_prompt_and_settings(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results"
    write_run(results, "full", None, FULL_TOKENS)
    ours = {"a-continue": [1, 2, 9, 4, 5, 6], "b-summary": [8, 9, 10, 11, 12, 13]}
    write_run(results, "capkv", Budget(tokens=4), ours)
    # another prompt's tokens under the same id, and another continuation length: not compared
    write_run(results, "snapkv", Budget(tokens=4), ours, digests={"b-summary": "other"})
    write_run(results, "h2o", Budget(tokens=4), ours, new_tokens=7)
    frames = aggregate(results)
    table = pd.read_csv(results / "long_generation.csv")
    assert list(table["method"]) == ["full", "full", "capkv", "capkv", "snapkv"]
    capkv = table[table["method"] == "capkv"].set_index("prompt")
    assert list(capkv["identical_tokens"]) == [2, 0]
    assert capkv.loc["b-summary", "rouge_l"] == 5 / 6  # the LCS is 5 of 6 tokens
    assert (capkv["bound"] == 4 + 8).all() and (capkv["generated"] == 6).all()
    assert (capkv["seconds"] == 3.5).all() and (capkv["final_tokens_mean_layer"] == 6).all()
    full = table[table["method"] == "full"]
    assert (full["identical_tokens"] == 6).all() and full["bound"].isna().all()
    markdown = (results / "long_generation.md").read_text()
    assert "| tiny | full | chunk8-every2 | full | 2 | 6.0 | 6 | 1.000 |  | 12 |" in markdown
    assert "| tiny | capkv | chunk8-every2 | 4 | 2 | 1.0 | 0 |" in markdown
    assert "| tiny | snapkv | chunk8-every2 | 4 | 1 |" in markdown
    assert frames["main_table"].empty and frames["paired"].empty  # not scores in [0, 1]
