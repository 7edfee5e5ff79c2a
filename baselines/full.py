"""The full cache: no eviction, the reference every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from capkv.engine.budget import Budget
from capkv.engine.method import EvictionMethod


@dataclass
class Full(EvictionMethod):
    """Keeps every token; any budget is ignored."""

    @property
    def evicts(self) -> bool:
        return False

    def check_budget(self, budget: Budget) -> None:
        return None
