"""The allocation figure: tokens kept per (layer, KV head) by CapKV's model-wide allocation on one
needle prompt, as a heatmap, beside PyramidKV's hand-made schedule for the same budget.

    python -m capkv.figures.allocation [--model smollm2-135m] [--context-length 4096] [--depth 50]
        [--ratio 0.75 | --budget 512] [--out plots/<model>_allocation.png]

One prefill records both allocations (sweep mode's :func:`capkv.engine.compression.record_kept`); nothing is
decoded. The figure shows where CapKV's objective puts the budget: which layers and heads hold the
capacity, against a schedule that only shrinks with depth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from baselines import PyramidKV  # noqa: E402
from capkv.cap import CapKV  # noqa: E402
from capkv.engine.budget import Budget  # noqa: E402
from capkv.engine.compression import record_kept  # noqa: E402
from capkv.harness.runner import prefill, prefill_ids, prepared_examples  # noqa: E402
from capkv.tasks.needle import NeedleTask  # noqa: E402


def allocations(
    model, tokenizer, context_length: int, depth: float, budget: Budget
) -> tuple[np.ndarray, list[float], int]:
    """Tokens kept per (layer, KV head) by CapKV (``allocation=model``) and per KV head per layer
    by PyramidKV, on one needle prompt (query-aware); and the prompt length."""
    task = NeedleTask(context_lengths=[context_length], depths=[depth])
    example, prompt = prepared_examples(model, tokenizer, task).prepared[0]
    selections = [(CapKV(allocation="model"), budget), (PyramidKV(), budget)]
    with torch.inference_mode(), record_kept(model, selections) as (capkv, pyramid):
        prefill(model, prefill_ids(prompt, "query_aware"), DynamicCache())
    if capkv.kept_per_head() is None:
        raise ValueError(
            f"{budget.label} keeps the whole {prompt.length}-token prompt, so nothing is "
            "allocated; pass a smaller --budget or a larger --ratio."
        )
    return np.array(capkv.kept_per_head()), pyramid.kept_per_layer(), prompt.length


def draw(per_head: np.ndarray, schedule: list[float], title: str, path: Path) -> plt.Figure:
    """Heatmap of ``per_head`` (layers x KV heads) beside the PyramidKV schedule, saved to
    ``path``."""
    layers = np.arange(per_head.shape[0])
    figure, (heat, side) = plt.subplots(
        1, 2, figsize=(8, 0.22 * len(layers) + 2.2), sharey=True, width_ratios=[3, 2]
    )
    image = heat.imshow(per_head, aspect="auto", cmap="viridis", origin="upper")
    heat.set_xlabel("KV head")
    heat.set_ylabel("layer")
    heat.set_xticks(range(per_head.shape[1]))
    heat.set_title("CapKV, model-wide allocation")
    figure.colorbar(image, ax=heat, label="tokens kept")
    side.plot(per_head.mean(axis=1), layers, "o-", label="CapKV (mean over heads)")
    side.plot(schedule, layers, "s--", label="PyramidKV schedule")
    side.set_xlabel("tokens kept per KV head")
    side.set_title("per layer")
    side.legend(fontsize="small", loc="lower right")  # clear of both curves
    side.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return figure


def main(argv: list[str] | None = None) -> Path:
    from capkv.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--depth", type=float, default=50.0)
    parser.add_argument("--ratio", type=float, default=None)
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    budget = Budget(tokens=args.budget) if args.budget is not None else None
    budget = budget or Budget(ratio=0.75 if args.ratio is None else args.ratio)
    model, tokenizer = load_model(args.model, dtype="float32", attn_implementation="sdpa")
    per_head, schedule, length = allocations(
        model, tokenizer, args.context_length, args.depth, budget
    )
    out = args.out or Path("plots") / f"{args.model}_allocation_{budget.label}.png"
    title = (
        f"{args.model}: tokens kept per KV head, needle at depth {args.depth:g}%, "
        f"{length} tokens, {budget.label}"
    )
    draw(per_head, schedule, title, out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
