"""Scores by turn (shared-context runs, SCBench's multi-request mode): the headline per question
index with its interval, turn 1 against the later turns over contexts, every method against
CapKV on the later turns; only where shared-context runs are."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from capkv import Budget
from capkv.results.metrics import write_metrics
from capkv.results.store import EXAMPLES, ExampleLog, identity_directory, run_identity
from capkv.results.tables import aggregate
from capkv.tasks.base import Reporting

MODEL = "org/tiny-0.5b"
TASK = "scbench_kv"
SHARED = "shared_context"
CONTEXTS = [("a", 0), ("a", 1), ("a", 2), ("b", 0)]  # subtask a: three contexts; b: one
BUDGET = Budget(tokens=64)
# (method, variant) -> turn -> subtask -> each question's score at that turn.
SCORES = {
    ("capkv", ""): {1: {"a": 1.0, "b": 0.0}, 2: {"a": 0.5, "b": 0.5}, 3: {"a": 0.0, "b": 0.0}},
    ("snapkv", ""): {1: {"a": 1.0, "b": 0.0}, 2: {"a": 0.0, "b": 0.0}, 3: {"a": 0.0, "b": 0.0}},
    ("capkv", "accumulate"): {1: {"a": 1.0, "b": 0.0}, 2: {"a": 1.0, "b": 1.0}, 3: {"a": 0.5, "b": 0.5}},
    ("snapkv", "accumulate"): {1: {"a": 1.0, "b": 0.0}, 2: {"a": 1.0, "b": 1.0}, 3: {"a": 0.5, "b": 0.5}},
}  # fmt: skip


def row(example_id: str, subtask: str, score: float, **turn: object) -> dict:
    """One ``examples.jsonl`` row with the fields the runner writes (and a shared run's turn)."""
    return {
        "example_id": example_id,
        "subtask": subtask,
        "prediction": "42",
        "answers": ["42"],
        "scores": {"m": score, "other": 1.0 - score},
        "prompt_tokens": 900,
        "kept_tokens_per_layer": [64, 64],
        "seconds": 0.1,
        "metadata": {},
        **turn,
    }


def shared_rows(scores: dict[int, dict[str, float]]) -> list[dict]:
    """Three questions of each context of :data:`CONTEXTS`, scored by turn and subtask."""
    rows = []
    for subtask, index in CONTEXTS:
        first = f"{subtask}/{index}/q1"
        for turn, by_subtask in scores.items():
            example_id = f"{subtask}/{index}/q{turn}"
            rows.append(
                row(example_id, subtask, by_subtask[subtask], turn=turn, turns=3, context=first)
            )
    random.Random(0).shuffle(rows)  # the file order changes nothing
    return rows  # fmt: skip


def write_run(
    results: Path, method: str, variant: str, budget: Budget | None, protocol: str, rows: list[dict]
) -> None:
    """One run folder with ``examples.jsonl`` and ``metrics.json``, as the runner writes it."""
    identity = run_identity(MODEL, TASK, method, variant, budget, protocol)
    run_dir = identity_directory(results, identity)
    log = ExampleLog(run_dir / EXAMPLES, [])
    for example in rows:
        log.append(example)
    log.close()
    write_metrics(run_dir, identity, rows, reporting=Reporting("custom", "m"))


def write_shared_tree(results: Path) -> None:
    """The shared-context runs of :data:`SCORES` at 64 tokens, and a query-aware CapKV run of
    the same task whose rows carry no turn (left out of the turn tables)."""
    for (method, variant), scores in SCORES.items():
        write_run(results, method, variant, BUDGET, SHARED, shared_rows(scores))
    plain = [row(f"{s}/{i}", s, 1.0) for s, i in CONTEXTS]
    write_run(results, "capkv", "", BUDGET, "query_aware", plain)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("turns")
    write_shared_tree(results)
    aggregate(results)
    return results


def test_the_headline_per_turn_is_the_mean_of_subtask_means_with_its_interval(
    shared: Path,
) -> None:
    table = pd.read_csv(shared / "turns.csv", keep_default_na=False)
    assert set(table["protocol"]) == {SHARED}  # the query-aware run carries no turn
    assert set(table["metric"]) == {"m"}  # the headline only
    labels = table["method"] + table["variant"].map(lambda v: f"-{v}" if v else "")
    assert list(dict.fromkeys(labels)) == [
        "capkv",
        "capkv-accumulate",
        "snapkv",
        "snapkv-accumulate",
    ]
    by_run = table.assign(label=labels).set_index(["label", "turn"])
    # Turn 1: subtask a scores 100 (three contexts), b 0 (one): 50, not the pooled 75.
    assert by_run["score"].to_dict() == pytest.approx(
        {
            **{("capkv", 1): 50.0, ("capkv", 2): 50.0, ("capkv", 3): 0.0},
            **{("snapkv", 1): 50.0, ("snapkv", 2): 0.0, ("snapkv", 3): 0.0},
            **{("capkv-accumulate", t): s for t, s in [(1, 50.0), (2, 100.0), (3, 50.0)]},
            **{("snapkv-accumulate", t): s for t, s in [(1, 50.0), (2, 100.0), (3, 50.0)]},
        }
    )
    assert set(table["n"]) == {4}
    # Within a subtask every question scores alike, so its resamples are constant.
    assert (table["low"] == table["score"]).all() and (table["high"] == table["score"]).all()
    text = (shared / "turns.md").read_text()
    assert "| model | task | protocol | method | budget | metric | turn 1 (n=4) |" in text
    assert "| 50.0 [50.0, 50.0] | 50.0 [50.0, 50.0] | 0.0 [0.0, 0.0] |" in text


def test_turn_one_is_paired_with_the_mean_of_its_context_s_later_turns(shared: Path) -> None:
    paired = pd.read_csv(shared / "turns_paired.csv", keep_default_na=False)
    first = paired[paired["comparison"] == "turn1_vs_later"]
    capkv = first[(first["method"] == "capkv") & (first["variant"] == "")].iloc[0]
    # Per context: a: 100 - (50 + 0) / 2 = 75 (three contexts); b: 0 - 25 = -25. Mean over
    # subtasks: 25.
    assert capkv["difference"] == pytest.approx(25.0)
    assert (capkv["n"], capkv["wins"], capkv["losses"], capkv["ties"]) == (4, 3, 1, 0)
    assert capkv["low"] == pytest.approx(25.0) and capkv["high"] == pytest.approx(25.0)
    assert capkv["reference"] == "later turns"
    snapkv = first[(first["method"] == "snapkv") & (first["variant"] == "")].iloc[0]
    assert snapkv["difference"] == pytest.approx((100.0 + 0.0) / 2)
    assert len(first) == 4  # every shared run, none of the query-aware one


def test_every_method_is_paired_with_capkv_on_the_same_later_questions(shared: Path) -> None:
    paired = pd.read_csv(shared / "turns_paired.csv", keep_default_na=False)
    versus = paired[paired["comparison"] == "vs_capkv_later"]
    rows = {(r.method, r.variant): r for r in versus.itertuples(index=False)}
    assert set(rows) == {("snapkv", ""), ("capkv", "accumulate"), ("snapkv", "accumulate")}
    snapkv = rows["snapkv", ""]
    # Turn 2: 0 - 50 on every question, turn 3: 0 - 0: -25 in each subtask.
    assert snapkv.reference == "capkv" and snapkv.difference == pytest.approx(-25.0)
    assert (snapkv.n, snapkv.wins, snapkv.losses, snapkv.ties) == (8, 0, 4, 4)
    # Four differing questions, two of them alone in subtask b: the interval excludes 0, but
    # the sign-flip test cannot reject "no difference" (p near 1/8): a tie, as paired.csv says.
    assert snapkv.high < 0 and 0.05 < snapkv.p_value < 0.2 and snapkv.verdict == "tie"
    accumulate = rows["capkv", "accumulate"]  # a CapKV variant against plain CapKV
    assert accumulate.reference == "capkv" and accumulate.difference == pytest.approx(50.0)
    assert accumulate.p_value < 0.05 and accumulate.verdict == "better"  # all 8 questions won
    same = rows["snapkv", "accumulate"]  # against CapKV of its own variant
    assert same.reference == "capkv-accumulate" and same.difference == 0.0
    assert same.p_value == 1.0 and same.verdict == "tie"
    text = (shared / "turns_paired.md").read_text()
    line = "| snapkv | vs_capkv_later | capkv | 8 | -25.0 [-45.8, -8.2] | 0.129 | 0/4/4 | tie |"
    assert line in text


def test_no_turn_table_where_no_run_is_shared(tmp_path: Path, shared: Path) -> None:
    results = tmp_path / "results"
    write_run(results, "capkv", "", BUDGET, "query_aware", [row("a/0", "a", 1.0)])
    for name in ("turns.csv", "turns.md", "turns_paired.csv", "turns_paired.md"):
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_text("stale")  # tables of runs since deleted
    frames = aggregate(results)
    assert frames["turns"].empty and frames["turns_paired"].empty
    assert not list(results.glob("turns*"))
    assert (results / "main_table.csv").exists()
