"""Example shards: assignment, one cell read as one whatever the shard count, per-shard locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from baselines import StreamingLLM
from capkv import Budget, CapKV
from capkv.harness.runner import Cell, CellBusy, RunLog, shard_lock_path
from capkv.harness.shards import Shard, check_shards, select_shard, shard_assignment
from capkv.harness.sweep import run_sweep
from capkv.results.store import METRICS, finished_rows, identity_directory, rows_files, run_identity
from capkv.results.tables import aggregate
from capkv.tasks.base import Example
from capkv.tasks.needle import NeedleTask

ROOT = Path(__file__).resolve().parents[2]
TASK = NeedleTask(context_lengths=[200, 300, 400], depths=[0, 50, 100])


def example(example_id: str, subtask: str, length: int) -> Example:
    metadata = {"subtask": subtask, "context_length": length}
    return Example(example_id, "context", "question", ["answer"], 8, metadata=metadata)


def grid(per_group: int) -> list[Example]:
    return [
        example(f"{subtask}_len{length}_{i:03d}", subtask, length)
        for subtask, length in product(["niah_single", "vt", "cwe"], [2048, 4096])
        for i in range(per_group)
    ]


@pytest.mark.parametrize(("per_group", "count"), [(3, 2), (5, 4), (7, 3), (1, 4)])
def test_every_example_is_in_exactly_one_shard_and_shards_are_balanced(per_group, count):
    examples = grid(per_group)
    shards = [select_shard(examples, Shard(i, count)) for i in range(count)]
    ids = [e.example_id for shard in shards for e in shard]
    assert sorted(ids) == sorted(e.example_id for e in examples)
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    for subtask, length in product(["niah_single", "vt", "cwe"], [2048, 4096]):
        in_group = [
            sum(e.metadata == {"subtask": subtask, "context_length": length} for e in shard)
            for shard in shards
        ]
        assert max(in_group) - min(in_group) <= 1, (subtask, length, in_group)


def test_assignment_depends_on_the_ids_only_not_on_order_or_process():
    examples = grid(5)
    assignment = shard_assignment(examples, 3)
    assert shard_assignment(list(reversed(examples)), 3) == assignment
    # The same in a fresh interpreter (another PYTHONHASHSEED): no use of hash().
    code = (
        "import json, sys; from capkv.harness.shards import shard_assignment; "
        "from capkv.tasks.base import Example; "
        "examples = [Example(i, '', '', [], 1, metadata=m) for i, m in json.load(sys.stdin)]; "
        "print(json.dumps(shard_assignment(examples, 3)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([[e.example_id, e.metadata] for e in examples]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert json.loads(other.stdout) == assignment
    # A shard keeps the task's order.
    ids = [e.example_id for e in examples]
    chosen = [e.example_id for e in select_shard(examples, Shard(1, 3))]
    assert chosen == sorted(chosen, key=ids.index)


@pytest.mark.parametrize(
    ("shards", "shard", "message"),
    [
        (0, 0, "shards=0 must be a whole number of shards, 1 or more."),
        (2.5, 0, "shards=2.5 must be a whole number"),
        (2, 2, "shard=2 is not one of the 2 shards [0, 2); pass 0 to 1."),
        (2, -1, "shard=-1 is not one of the 2 shards"),
        (1, 1, "pass shards=N with N above 1."),
    ],
)
def test_a_shard_outside_the_shards_is_refused_in_one_sentence(shards, shard, message):
    with pytest.raises(ValueError) as error:
        check_shards(shards, shard)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def identity(method: str) -> dict[str, Any]:
    return run_identity("tiny", "needle", method, "", Budget(tokens=64), "query_aware")


def sweep(results, model, tokenizer, shard: Shard) -> list[dict]:
    """A 2-cell sweep of TASK's 9 examples into ``results``, as one shard."""
    cells = [
        Cell(
            method,
            Budget(tokens=64),
            identity_directory(results, identity(name)),
            identity(name),
            shard,
        )
        for name, method in [("capkv", CapKV()), ("streamingllm", StreamingLLM())]
    ]
    return run_sweep(model, tokenizer, TASK, cells, "query_aware")


def tables(results) -> dict[str, str]:
    aggregate(results)
    return {name: (results / name).read_text() for name in ("scores.csv", "needle.csv")}


def metrics_of(results) -> list[dict]:
    return [
        json.loads((identity_directory(results, identity(name)) / METRICS).read_text())
        for name in ("capkv", "streamingllm")
    ]


def test_a_cell_run_as_three_shards_has_the_metrics_and_tables_of_one_run(tmp_path, gqa_model):
    model, tokenizer = gqa_model
    sweep(tmp_path / "one", model, tokenizer, Shard(0, 1))
    for index in (2, 0, 1):  # finishing order does not matter
        sweep(tmp_path / "three", model, tokenizer, Shard(index, 3))
    assert metrics_of(tmp_path / "three") == metrics_of(tmp_path / "one")
    assert tables(tmp_path / "three") == tables(tmp_path / "one")
    cell = identity_directory(tmp_path / "three", identity("capkv"))
    assert [p.name for p in rows_files(cell)] == [
        f"examples.shard-{i}-of-3.jsonl" for i in range(3)
    ]
    assert len(finished_rows(cell)) == 9


def test_a_cell_with_a_missing_shard_says_how_many_examples_it_holds(tmp_path, gqa_model, capsys):
    model, tokenizer = gqa_model
    sweep(tmp_path, model, tokenizer, Shard(1, 3))
    capkv, _ = metrics_of(tmp_path)
    assert (capkv["n_examples"], capkv["n_expected"]) == (3, 9)
    capsys.readouterr()
    aggregate(tmp_path)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and "holds 3 of 9 examples" in warnings[0]
    assert "holds 3 of 9 examples" in (tmp_path / "main_table.md").read_text()


def test_resuming_with_another_shard_count_runs_each_example_once(tmp_path, gqa_model):
    model, tokenizer = gqa_model
    sweep(tmp_path, model, tokenizer, Shard(0, 2))
    first = {
        row["example_id"] for row in finished_rows(identity_directory(tmp_path, identity("capkv")))
    }
    sweep(tmp_path, model, tokenizer, Shard(0, 1))  # the unsharded run does the rest
    cell = identity_directory(tmp_path, identity("capkv"))
    unsharded = [json.loads(line) for line in (cell / "examples.jsonl").read_text().splitlines()]
    assert {row["example_id"] for row in unsharded}.isdisjoint(first)
    counts = Counter(row["example_id"] for row in finished_rows(cell))
    assert len(counts) == 9 and set(counts.values()) == {1}
    assert metrics_of(tmp_path)[0]["n_examples"] == 9


def test_a_second_writer_of_a_cell_and_shard_is_refused_until_the_first_is_gone(tmp_path):
    run_dir = tmp_path / "cell"
    first = RunLog(run_dir, identity("capkv"), Shard(0, 2))
    first.start(["a", "b"])
    with pytest.raises(CellBusy) as error:
        RunLog(run_dir, identity("capkv"), Shard(0, 2)).start(["a", "b"])
    assert str(error.value).startswith(f"Another process is writing shard 0 of 2 of {run_dir}")
    RunLog(run_dir, identity("capkv"), Shard(1, 2)).start(["a", "b"])  # another shard: fine
    first.close()
    RunLog(run_dir, identity("capkv"), Shard(0, 2)).start(["a", "b"])


def test_a_killed_writer_releases_its_cell_and_shard(tmp_path):
    run_dir = tmp_path / "cell"
    code = (
        "import sys, time; from pathlib import Path; from capkv.harness.runner import RunLog; "
        "from capkv.harness.shards import Shard; "
        "RunLog(Path(sys.argv[1]), {}, Shard(0, 2)).start([]); print('held', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CellBusy):
            RunLog(run_dir, identity("capkv"), Shard(0, 2)).start([])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    assert shard_lock_path(run_dir, Shard(0, 2)).exists()  # the file stays, the lock does not
    RunLog(run_dir, identity("capkv"), Shard(0, 2)).start([])
