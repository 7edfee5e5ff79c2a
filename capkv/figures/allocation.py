"""The allocation figure: tokens kept per (layer, KV head) by CapKV's model-wide allocation on one
needle prompt, as a heatmap, beside PyramidKV's hand-made schedule for the same budget.

    python -m capkv.figures.allocation [--results results] [--plots plots]

Drawn from the tables ``scripts/allocation_map.py`` writes under ``<results>/allocation/`` (the
figure reads results only; the script runs the prefill). The figure shows where CapKV's objective
puts the budget: which layers and heads hold the capacity, against a schedule that only shrinks
with depth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ALLOCATION_DIR = "allocation"  # under a results folder


def table_path(folder: Path, model: str, budget_label: str) -> Path:
    """Where the allocation table of ``model`` at ``budget_label`` lives; the plot's name too."""
    return folder / f"{model}_allocation_{budget_label}.csv"


def read_table(path: Path) -> tuple[np.ndarray, list[float], str]:
    """CapKV's tokens per (layer, KV head), PyramidKV's per layer, and the figure's title."""
    table = pd.read_csv(path).sort_values(["layer", "kv_head"])
    layers, heads = table["layer"].nunique(), table["kv_head"].nunique()
    per_head = table["capkv_tokens"].to_numpy().reshape(layers, heads)
    schedule = table.groupby("layer")["pyramidkv_tokens"].first().tolist()
    prompt = json.loads(path.with_suffix(".json").read_text())
    title = (
        f"{prompt['model']}: tokens kept per KV head, needle at depth {prompt['depth']:g}%, "
        f"{prompt['prompt_tokens']} tokens, {prompt['budget']}"
    )
    return per_head, schedule, title


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


def draw_allocations(results_dir: Path, plots_dir: Path) -> list[Path]:
    """One figure per table under ``<results_dir>/allocation/``; returns the plots written."""
    written = []
    for table in sorted((results_dir / ALLOCATION_DIR).glob("*.csv")):
        out = plots_dir / table.with_suffix(".png").name
        draw(*read_table(table), out)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--plots", type=Path, default=Path("plots"))
    args = parser.parse_args(argv)
    written = draw_allocations(args.results, args.plots)
    if not written:
        raise SystemExit(
            f"error: no allocation table under {args.results / ALLOCATION_DIR}/; write one with "
            "`python scripts/allocation_map.py`."
        )
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
