"""Example shards: which examples of a task one of N processes runs.

The unit of parallel work is a shard of examples, never a cell: sweep mode's saving needs every
(method, budget) cell of an example in the process that prefilled it. Assignment is a function of
the examples' ids and of what sets them apart (subtask, context length), never of the machine,
the process or the order the task yields them:

- examples are grouped by (subtask, context length) and each group is ordered by the SHA-256 of
  its ids (a stable pseudo-random order: neighbouring ids are not dealt to neighbouring shards);
- the groups, in sorted order, are dealt round-robin to shards 0..N-1, the deal continuing from one
  group to the next.

So each shard holds ``floor`` or ``ceil`` of ``group size / N`` examples of every group and of the
whole task: shards are balanced across tasks and context lengths, not only in expectation.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capkv.tasks.base import Example


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``Shard(0, 1)``: every example, the unsharded run)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        check_shards(self.count, self.index)

    @property
    def rows_file(self) -> str:
        """The file this shard appends its rows to in a cell's folder (``examples.jsonl`` for
        an unsharded run, ``examples.shard-2-of-4.jsonl`` for shard 2 of 4)."""
        if self.count == 1:
            return "examples.jsonl"
        return f"examples.shard-{self.index}-of-{self.count}.jsonl"

    @property
    def label(self) -> str:
        return f"shard {self.index} of {self.count}"


def check_shards(shards: Any, shard: Any) -> None:
    """Refuse a shard count or index that names no shard, with one sentence."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards={shards!r} must be a whole number of shards, 1 or more.")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < shards:
        hint = f"pass shards=N with N above {shard}" if shards == 1 else f"pass 0 to {shards - 1}"
        raise ValueError(
            f"shard={shard!r} is not one of the {shards} shards [0, {shards}); {hint}."
        )


def id_hash(example_id: str) -> str:
    """A hash of the id that is the same on every machine and in every run (not ``hash()``)."""
    return hashlib.sha256(example_id.encode()).hexdigest()


def group_key(example: Example) -> tuple[str, str]:
    """What shards are balanced over: the subtask and the context length."""
    meta = example.metadata
    return str(meta.get("subtask") or ""), str(meta.get("context_length", ""))


def shard_assignment(examples: Sequence[Example], count: int) -> dict[str, int]:
    """The shard (0..count-1) of every example id."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for example in examples:
        groups[group_key(example)].append(example.example_id)
    assignment = {}
    position = 0
    for key in sorted(groups):
        for example_id in sorted(groups[key], key=lambda i: (id_hash(i), i)):
            assignment[example_id] = position % count
            position += 1
    return assignment


UNSHARDED = Shard(0, 1)


def select_shard(examples: Sequence[Example], shard: Shard) -> list[Example]:
    """The examples of ``shard``, in the task's order."""
    if shard.count == 1:
        return list(examples)
    assignment = shard_assignment(examples, shard.count)
    return [e for e in examples if assignment[e.example_id] == shard.index]
