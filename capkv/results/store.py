"""The run-folder store: where one run's files live, what identifies a run, its rows files
(read back valid row by valid row) and the config it was run with.

One run = one (model, task, method, budget, protocol) cell, in its own directory::

    <results>/runs/<model>/<task>/<method>/<budget>/<protocol>/
        examples.jsonl   one row per finished example, appended and flushed as it finishes
                         (shard i of N > 1 appends to examples.shard-i-of-N.jsonl instead)
        metrics.json     mean scores (x 100) overall and per subtask over the rows of every
                         rows file, with how many examples the cell holds of how many
        config.yaml      the resolved config, written before the first row

A rerun skips the examples already in any rows file of the cell, whatever shard count wrote
them; a killed run loses at most the example in flight.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capkv.engine.budget import Budget
from capkv.storage.files import AppendLog, write_atomically

log = logging.getLogger(__name__)

RUNS = "runs"

EXAMPLES = "examples.jsonl"

ROWS_GLOB = "examples*.jsonl"  # examples.jsonl and every examples.shard-i-of-N.jsonl

TABLES_LOCK = ".tables.lock"

METRICS = "metrics.json"

CONFIG = "config.yaml"

# What one run is, as separate fields: ``method`` is the method's name (its conf/method option),
# ``variant`` the name given to other hyperparameters (empty by default), ``budget_tokens`` and
# ``ratio`` the budget (at most one set; neither for the full cache). ``budget`` is the budget's
# label (``budget512``, ``ratio0.5``, ``full``): a folder name and a display, never parsed.
IDENTITY_KEYS = [
    "model",
    "task",
    "method",
    "variant",
    "budget",
    "budget_tokens",
    "ratio",
    "protocol",
]

RUN_KEYS = ["model", "task", "method", "variant", "budget", "protocol"]  # one run, as table keys

FULL_BUDGET = "full"  # the budget label of a run that evicts nothing


def method_label(method: str, variant: str) -> str:
    """``capkv``, or ``capkv-tau3`` for variant ``tau3``: a run's folder name and display."""
    return f"{method}-{variant}" if variant else method


def run_identity(
    model: str, task: str, method: str, variant: str, budget: Budget | None, protocol: str
) -> dict[str, Any]:
    """The identity fields of one run (:data:`IDENTITY_KEYS`); ``budget`` None is no eviction."""
    return {
        "model": model,
        "task": task,
        "method": method,
        "variant": str(variant or ""),
        "budget": budget.label if budget is not None else FULL_BUDGET,
        "budget_tokens": budget.tokens if budget is not None else None,
        "ratio": budget.ratio if budget is not None else None,
        "protocol": protocol,
    }


def run_directory(
    results_dir: str | Path, model: str, task: str, method: str, budget: str, protocol: str
) -> Path:
    """The directory of one run (``method`` is its label, :func:`method_label`); names are made
    path-safe (``/`` becomes ``--``)."""
    parts = [model, task, method, budget, protocol]
    return Path(results_dir, RUNS, *(part.replace("/", "--") for part in parts))


def identity_directory(results_dir: str | Path, identity: dict[str, Any]) -> Path:
    """The directory of the run with ``identity`` (from :func:`run_identity`)."""
    label = method_label(identity["method"], identity["variant"])
    parts = (identity["model"], identity["task"], label, identity["budget"], identity["protocol"])
    return run_directory(results_dir, *parts)


def rows_files(run_dir: Path) -> list[Path]:
    """Every rows file of a cell: ``examples.jsonl`` first, then the shards' files."""
    return sorted(Path(run_dir).glob(ROWS_GLOB))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one rows file, each valid one kept wherever it is in the file.

    A damaged line (a run killed mid-write, a line edited by hand) is reported with the file and
    line number and skipped; its example runs again, and the next write of the file leaves the
    line out. A row repeating an example already read is skipped too.
    """
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    seen = set()
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if not isinstance(row, dict) or "example_id" not in row:
                log.warning(
                    "%s, line %d, is not a result row (damaged or cut short); it is skipped and "
                    "its example runs again.",
                    path,
                    number,
                )
                continue
            if row["example_id"] not in seen:
                seen.add(row["example_id"])
                rows.append(row)
    return rows


def stored_config(run_dir: Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of a run folder (None when it has none yet).

    Raises
    ------
    ValueError
        If the file is not a YAML mapping with model, method and task sections.
    """
    path = run_dir / CONFIG
    if not path.exists():
        return None
    try:
        stored = OmegaConf.to_container(OmegaConf.load(path))
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as error:
        problem = f"is not a valid config ({str(error).splitlines()[0]})"
    else:
        if isinstance(stored, dict) and all(
            isinstance(stored.get(section), dict) for section in ("model", "method", "task")
        ):
            return stored
        problem = "lacks the model, method and task sections"
    raise ValueError(
        f"{path} {problem}, so what the rows beside it were run with is unknown; delete the "
        f"folder {run_dir} to rerun that cell."
    )


def finished_rows(
    run_dir: Path,
    order: list[str] | None = None,
    known: dict[Path, list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of a cell from all its rows files, each example once (two runs with different
    shard counts may both have finished it; their rows are equal but for ``seconds``).

    With ``order`` (example ids, e.g. the task's), rows follow it, so that a cell run as N shards
    yields its rows in the order of the unsharded run; rows of other ids follow in file order.
    ``known`` holds the rows of files the caller already has (its own shard's), which are not
    read again.
    """
    known = known or {}
    rows: dict[str, dict[str, Any]] = {}
    paths = sorted({*rows_files(run_dir), *known})
    for path in paths:
        for row in known[path] if path in known else read_rows(path):
            rows.setdefault(row["example_id"], row)
    if order is None:
        return list(rows.values())
    rank = {example_id: i for i, example_id in enumerate(order)}
    return sorted(rows.values(), key=lambda row: rank.get(row["example_id"], len(rank)))


class ExampleLog:
    """Appends one JSON row per example, whole and synced, or not at all.

    A row whose append fails (a full disk, an I/O error, Ctrl-C or SIGTERM mid-write) leaves
    the file as it was before it (:func:`capkv.storage.files.append_whole`), so no reader (a
    table rebuild, a resume, someone's pandas) ever sees a torn record.
    """

    def __init__(self, path: Path, rows: list[dict[str, Any]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite the valid rows so a torn last line (a SIGKILL mid-write) never stays in the file.
        write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
        self._log = AppendLog(path)

    def append(self, row: dict[str, Any]) -> None:
        self._log.append(json.dumps(row) + "\n")

    def close(self) -> None:
        self._log.close()
