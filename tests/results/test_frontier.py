"""Score against KV bytes (quantized and byte-budgeted runs): the Pareto front of score against
bytes held, and at each byte budget every candidate (the full cache where it fits) paired with
the best and each method with CapKV of its storage; only where byte-measured runs are."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from capkv import Budget
from capkv.engine.budget import ByteBudget
from capkv.engine.quantization import CacheQuantization
from capkv.results.frontier import ByteRun, best_of
from capkv.results.metrics import write_metrics
from capkv.results.store import CONFIG, EXAMPLES, ExampleLog, identity_directory, run_identity
from capkv.results.tables import aggregate
from capkv.results.uncertainty import Interval
from capkv.tasks.base import Reporting

MODEL = "org/tiny-0.5b"
TASK = "custom_task"
PROTOCOL = "query_aware"
EXAMPLES_OF = [(subtask, index) for subtask in ("a", "b") for index in range(4)]
FRACTION = ByteBudget(ratio=0.5, kv_fraction=0.25)  # kvfrac0.25
KV_BYTES = ByteBudget(tokens=16, kv_bytes=1024)  # kvbytes1024
# (method, storage (quantization, nbits) or None, budget) -> (mean kv_fraction_held, mean
# kv_bytes_per_head_layer, the score of every example of subtask a, of subtask b).
RUNS = {
    ("full", None, None): (2.0, 8192.0, 1.0, 1.0),
    ("full", ("bf16", None), None): (1.0, 4096.0, 1.0, 1.0),
    ("full", ("hqq", 2), None): (0.2, 820.0, 0.75, 0.75),
    ("capkv", None, FRACTION): (0.25, 1024.0, 0.5, 0.5),
    ("snapkv", None, FRACTION): (0.25, 1024.0, 0.0, 0.0),
    ("capkv", ("hqq", None), FRACTION): (0.25, 1024.0, 1.0, 1.0),
    ("snapkv", ("hqq", None), FRACTION): (0.25, 1024.0, 1.0, 0.5),
    ("capkv", ("hqq", 2), KV_BYTES): (0.24, 1000.0, 0.5, 0.5),
}  # fmt: skip


def row(subtask: str, index: int, score: float, held: float | None, per_head: float) -> dict:
    """One ``examples.jsonl`` row; with ``held``, the bytes fields of a byte-measured run (the
    first example holds a little less, the second a little more: the table keeps the mean)."""
    fields = {
        "example_id": f"{subtask}/{index}",
        "subtask": subtask,
        "prediction": "42",
        "answers": ["42"],
        "scores": {"m": score, "other": 1.0 - score},
        "prompt_tokens": 900,
        "kept_tokens_per_layer": [64, 64],
        "seconds": 0.1,
        "metadata": {},
    }
    if held is not None:
        jitter = {0: -0.01, 1: 0.01}.get(index, 0.0)
        fields |= {"kv_bytes": 4 * per_head, "kv_bytes_per_head_layer": per_head + 100 * jitter}
        fields["kv_fraction_held"] = held + jitter
    return fields


def write_run(
    results: Path,
    method: str,
    storage: tuple[str, int | None] | None,
    budget: Budget | None,
    rows: list[dict],
) -> None:
    """One run folder as the runner writes it: ``config.yaml`` (a ``cache:`` section for a
    quantized storage, a float32 model), ``examples.jsonl`` and ``metrics.json``."""
    settings = CacheQuantization(*storage) if storage is not None else CacheQuantization()
    identity = run_identity(MODEL, TASK, method, settings.label, budget, PROTOCOL)
    run_dir = identity_directory(results, identity)
    config = {
        "model": {"name": "tiny", "dtype": "float32"},
        "method": {"name": method},
        "task": {"name": TASK},
        "kv_bytes": getattr(budget, "kv_bytes", None),
        "kv_fraction": getattr(budget, "kv_fraction", None),
    }
    if storage is not None:
        config["cache"] = {"quantization": storage[0], "nbits": storage[1], "q_group_size": 16}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(yaml.safe_dump(config))
    log = ExampleLog(run_dir / EXAMPLES, [])
    for example in rows:
        log.append(example)
    log.close()
    write_metrics(run_dir, identity, rows, reporting=Reporting("custom", "m"))


def write_byte_tree(results: Path) -> None:
    """The runs of :data:`RUNS`, and a CapKV run of 64 tokens whose rows record no bytes."""
    for (method, storage, budget), (held, per_head, a, b) in RUNS.items():
        scores = {"a": a, "b": b}
        rows = [row(s, i, scores[s], held, per_head) for s, i in EXAMPLES_OF]
        write_run(results, method, storage, budget, rows)
    plain = [row(s, i, 1.0, None, 0.0) for s, i in EXAMPLES_OF]
    write_run(results, "capkv", None, Budget(tokens=64), plain)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("frontier")
    write_byte_tree(results)
    aggregate(results)
    return results


def labelled(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` indexed by each run's label (``capkv-q4-hqq``) and budget."""
    labels = table["method"] + table["variant"].map(lambda v: f"-{v}" if v else "")
    return table.assign(label=labels).set_index(["label", "budget"])


def test_each_byte_measured_run_has_its_storage_bits_score_bytes_and_front(
    measured: Path,
) -> None:
    table = labelled(pd.read_csv(measured / "frontier.csv", keep_default_na=False))
    assert ("capkv", "budget64") not in table.index  # its rows record no bytes
    assert len(table) == len(RUNS)
    assert set(table["metric"]) == {"m"} and set(table["n"]) == {8}
    bits = {key: (r.storage, r.bits) for key, r in table.iterrows()}
    assert bits == {
        ("full", "full"): ("none", 32),  # the float32 model's own precision
        ("full-q16-bf16", "full"): ("bf16", 16),
        ("full-q2-hqq", "full"): ("hqq", 2),
        ("capkv", "kvfrac0.25"): ("none", 32),
        ("snapkv", "kvfrac0.25"): ("none", 32),
        ("capkv-q4-hqq", "kvfrac0.25"): ("hqq", 4),  # nbits null: hqq's default
        ("snapkv-q4-hqq", "kvfrac0.25"): ("hqq", 4),
        ("capkv-q2-hqq", "kvbytes1024"): ("hqq", 2),
    }
    # Scores: the mean of subtask means, x 100; bytes: the means over the rows.
    assert table.loc[("snapkv-q4-hqq", "kvfrac0.25"), "score"] == pytest.approx(75.0)
    assert table.loc[("full-q2-hqq", "full"), "kv_fraction_held"] == pytest.approx(0.2)
    assert table.loc[("capkv-q2-hqq", "kvbytes1024"), "kv_bytes_per_head_layer"] == 1000.0
    front = {key for key, on in table["pareto"].items() if on}
    # The 16- and 32-bit full caches are dominated by 4-bit CapKV at a quarter of the bytes
    # (fewer bytes, the same score), CapKV in float32 at a quarter by the 2-bit full cache
    # (fewer bytes, a higher score), 4-bit SnapKV by 4-bit CapKV (as many bytes, a lower score).
    assert front == {("full-q2-hqq", "full"), ("capkv-q4-hqq", "kvfrac0.25")}
    text = (measured / "frontier.md").read_text()
    assert (
        "| method | budget | storage | bits | held | bytes/head/layer | metric | score (n=8) |"
        in text
    )
    held = [line.split(" | ")[7] for line in text.splitlines() if line.startswith(f"| {MODEL}")]
    assert held == sorted(held)  # rows by bytes held
    assert (
        "| capkv-q4-hqq | kvfrac0.25 | hqq | 4 | 0.250 | 1024 | m | 100.0 [100.0, 100.0] | yes |"
        in text
    )


def test_the_full_cache_competes_at_a_byte_budget_only_where_its_bytes_fit(
    measured: Path,
) -> None:
    paired = pd.read_csv(measured / "frontier_paired.csv", keep_default_na=False)
    best = paired[paired["comparison"] == "vs_best"]
    by_budget = best.groupby("byte_budget")
    others = {  # every candidate but the best
        budget: set(labelled(rows).index.get_level_values("label")) for budget, rows in by_budget
    }
    # kvfrac0.25: the 2-bit full cache (0.2) fits, the bf16 (1.0) and float32 (2.0) ones do not.
    assert others["kvfrac0.25"] == {"capkv", "snapkv", "snapkv-q4-hqq", "full-q2-hqq"}
    assert set(by_budget.get_group("kvfrac0.25")["reference"]) == {"capkv-q4-hqq"}
    # kvbytes1024: the 2-bit full cache holds 820 bytes per head and layer, and wins.
    assert others["kvbytes1024"] == {"capkv-q2-hqq"}
    assert set(by_budget.get_group("kvbytes1024")["reference"]) == {"full-q2-hqq"}
    text = (measured / "frontier_paired.md").read_text()
    assert f"{MODEL} · {TASK} · {PROTOCOL} · kvfrac0.25: capkv-q4-hqq" in text
    assert f"{MODEL} · {TASK} · {PROTOCOL} · kvbytes1024: full-q2-hqq" in text


def test_each_candidate_is_paired_with_the_best_and_each_method_with_capkv(
    measured: Path,
) -> None:
    paired = labelled(pd.read_csv(measured / "frontier_paired.csv", keep_default_na=False))
    rows = {(key[0], r.comparison): r for key, r in paired.iterrows()}
    full = rows["full-q2-hqq", "vs_best"]  # 75 - 100 on all eight examples
    assert full.byte_budget == "kvfrac0.25" and full.difference == pytest.approx(-25.0)
    assert (full.n, full.wins, full.losses, full.ties) == (8, 0, 8, 0)
    assert full.p_value < 0.05 and full.verdict == "worse"
    assert (full.storage, full.bits) == ("hqq", 2)
    # 0 - 50 in subtask b only: the interval excludes 0, but four differing examples cannot
    # reject "no difference": a tie, as everywhere.
    snapkv = rows["snapkv-q4-hqq", "vs_capkv_same_storage"]
    assert snapkv.reference == "capkv-q4-hqq" and snapkv.difference == pytest.approx(-25.0)
    assert snapkv.high < 0 and snapkv.p_value > 0.05 and snapkv.verdict == "tie"
    plain = rows["snapkv", "vs_capkv_same_storage"]  # against CapKV of its own storage
    assert plain.reference == "capkv" and plain.difference == pytest.approx(-50.0)
    assert plain.verdict == "worse"
    versus = paired[paired["comparison"] == "vs_capkv_same_storage"]
    assert sorted(versus.index.get_level_values("label")) == ["snapkv", "snapkv-q4-hqq"]
    text = (measured / "frontier_paired.md").read_text()
    line = "| kvfrac0.25 | full-q2-hqq | full | 2 | vs_best | capkv-q4-hqq | 8 | -25.0 [-25.0, -25.0] |"
    assert line in text


def test_of_equal_scores_the_best_holds_fewer_bytes() -> None:
    def candidate(method: str, held: float) -> ByteRun:
        shares = {"kv_fraction_held": held, "kv_bytes_per_head_layer": 4096 * held}
        return ByteRun({"method": method}, {}, "m", {}, Interval(50.0, 40.0, 60.0, 8), shares)

    first, lighter = candidate("capkv", 0.25), candidate("snapkv", 0.2)
    assert best_of([first, lighter]) is lighter
    higher = ByteRun({"method": "h2o"}, {}, "m", {}, Interval(51.0, 40.0, 60.0, 8), first.held)
    assert best_of([first, lighter, higher]) is higher


def test_no_frontier_table_where_no_run_measured_bytes(tmp_path: Path) -> None:
    results = tmp_path / "results"
    write_run(results, "capkv", None, Budget(tokens=64), [row("a", 0, 1.0, None, 0.0)])
    for name in ("frontier.csv", "frontier.md", "frontier_paired.csv", "frontier_paired.md"):
        (results / name).write_text("stale")  # tables of runs since deleted
    frames = aggregate(results)
    assert frames["frontier"].empty and frames["frontier_paired"].empty
    assert not list(results.glob("frontier*"))
    assert (results / "main_table.csv").exists()
