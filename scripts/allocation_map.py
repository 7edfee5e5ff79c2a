"""CapKV's model-wide allocation per (layer, KV head) beside PyramidKV's schedule, on one needle
prompt, into the table the allocation figure draws (``python -m capkv.figures.allocation``).

    .venv/bin/python scripts/allocation_map.py [--model smollm2-135m] [--context-length 4096]
        [--depth 50] [--ratio 0.75 | --budget 512] [--results results]

One prefill records both allocations (sweep mode's :func:`capkv.engine.compression.record_kept`);
nothing is decoded. Writes ``<results>/allocation/<model>_allocation_<budget>.csv`` (one row per
layer and KV head: ``capkv_tokens``, ``pyramidkv_tokens``) and a ``.json`` beside it with the
prompt it was measured on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import DynamicCache

from baselines import PyramidKV
from capkv.cap import CapKV
from capkv.engine.budget import Budget
from capkv.engine.compression import record_kept
from capkv.figures.allocation import ALLOCATION_DIR, table_path
from capkv.harness.runner import prefill, prefill_ids, prepared_examples
from capkv.storage.files import write_atomically
from capkv.tasks.needle import NeedleTask


def allocations(
    model: Any, tokenizer: Any, context_length: int, depth: float, budget: Budget
) -> tuple[np.ndarray, list[float], int]:
    """Tokens kept per (layer, KV head) by CapKV (``allocation=model``) and per KV head per layer
    by PyramidKV, on one needle prompt (query-aware); and the prompt length."""
    task = NeedleTask(context_lengths=[context_length], depths=[depth])
    _, prompt = prepared_examples(model, tokenizer, task).prepared[0]
    selections = [(CapKV(allocation="model"), budget), (PyramidKV(), budget)]
    with torch.inference_mode(), record_kept(model, selections) as (capkv, pyramid):
        prefill(model, prefill_ids(prompt, "query_aware"), DynamicCache())
    if capkv.kept_per_head() is None:
        raise ValueError(
            f"{budget.label} keeps the whole {prompt.length}-token prompt, so nothing is "
            "allocated; pass a smaller --budget or a larger --ratio."
        )
    return np.array(capkv.kept_per_head()), pyramid.kept_per_layer(), prompt.length


def allocation_table(per_head: np.ndarray, schedule: list[float]) -> pd.DataFrame:
    """One row per (layer, KV head): CapKV's tokens there, and PyramidKV's for that layer."""
    layers, heads = per_head.shape
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads),
            "kv_head": np.tile(np.arange(heads), layers),
            "capkv_tokens": per_head.reshape(-1),
            "pyramidkv_tokens": np.repeat(np.asarray(schedule, dtype=float), heads),
        }
    )


def main(argv: list[str] | None = None) -> Path:
    from capkv.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--depth", type=float, default=50.0)
    parser.add_argument("--ratio", type=float, default=None)
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    budget = Budget(tokens=args.budget) if args.budget is not None else None
    budget = budget or Budget(ratio=0.75 if args.ratio is None else args.ratio)
    model, tokenizer = load_model(args.model, dtype="float32", attn_implementation="sdpa")
    per_head, schedule, length = allocations(
        model, tokenizer, args.context_length, args.depth, budget
    )
    path = table_path(args.results / ALLOCATION_DIR, args.model, budget.label)
    prompt = {"model": args.model, "depth": args.depth, "prompt_tokens": length}
    write_atomically(path, allocation_table(per_head, schedule).to_csv(index=False))
    write_atomically(path.with_suffix(".json"), json.dumps({**prompt, "budget": budget.label}))
    print(f"wrote {path} (draw it: python -m capkv.figures.allocation --results {args.results})")
    return path


if __name__ == "__main__":
    main()
