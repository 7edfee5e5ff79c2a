"""The order methods appear in, in every table and figure: the full cache, CapKV, the baselines,
the allocations, then any other method by name."""

from __future__ import annotations

from typing import Any

FULL = "full"  # the method (and budget label) of the full cache
METHOD_ORDER = [
    FULL,
    "capkv",
    "snapkv",
    "pyramidkv",
    "h2o",
    "streamingllm",
    "random",
    "capkv_adaptive",
    "capkv_model",
    "capkv_iterative",
    "snapkv_adaptive",
    "pyramidkv_adaptive",
]


def method_sort_key(method: str, variant: str = "") -> tuple[int, str, str]:
    """The full cache, then CapKV, then the baselines in a fixed order, then any other method;
    a method's variants after it, by name."""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, method, variant


def budget_order(metrics: dict[str, Any]) -> tuple:
    """A run's place among runs of its (model, task, protocol): the full cache first, then
    budgets from the tightest (token budgets before ratios); callers add the method key."""
    tokens, ratio = metrics["budget_tokens"], metrics["ratio"]
    return (
        metrics["model"],
        metrics["task"],
        metrics["protocol"],
        metrics["method"] != FULL,
        tokens is None,
        tokens or 0,
        -(ratio or 0),
    )


def run_order(metrics: dict[str, Any]) -> tuple:
    """A run's place in a table of runs: model, task and protocol, then the full cache, budgets
    from the tightest, then methods (:func:`method_sort_key`)."""
    return (*budget_order(metrics), method_sort_key(metrics["method"], metrics["variant"]))
