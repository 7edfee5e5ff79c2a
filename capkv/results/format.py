"""How tables are shown: Markdown without tabulate, scores with their intervals, identity
columns with their types.
"""

from __future__ import annotations

import math

import pandas as pd


def with_identity_types(frame: pd.DataFrame) -> pd.DataFrame:
    """``budget_tokens`` as whole numbers (blank where a run has none), ``ratio`` as floats."""
    if "budget_tokens" in frame:
        frame["budget_tokens"] = frame["budget_tokens"].astype("Int64")
        frame["ratio"] = frame["ratio"].astype(float)
    return frame


def markdown(frame: pd.DataFrame, digits: dict[str, int] | None = None) -> str:
    """A Markdown table (pandas' to_markdown needs tabulate; this does not): floats with one
    decimal, or ``digits[column]`` decimals; missing values are left blank."""
    if frame.empty:
        return "(no runs yet)\n"
    columns = [str(c) for c in frame.columns]
    places = [(digits or {}).get(column, 1) for column in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for values in frame.itertuples(index=False):
        cells = [
            ("" if math.isnan(v) else f"{v:.{n}f}") if isinstance(v, float) else str(v)
            for v, n in zip(values, places, strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def with_interval(mean: float, low: float, high: float) -> str:
    """``62.3 [55.1, 69.0]``: a mean and its interval; blank where the mean is missing."""
    if pd.isna(mean):
        return ""
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def interval_markdown(table: pd.DataFrame, columns: list[str]) -> str:
    """``table`` in Markdown, each of ``columns`` shown as ``mean [low, high]`` from its
    ``<column> low`` and ``<column> high`` columns; its ``<column> n`` goes in the header as
    ``(n=N)`` when every row has the same N, else into each cell."""
    extra = {f"{column} {part}" for column in columns for part in ("low", "high", "n")}
    shown = table[[c for c in table.columns if c not in extra]].copy()
    for column in columns:
        counts = table[f"{column} n"]
        uniform = counts.dropna().nunique() <= 1
        shown[column] = [
            with_interval(mean, low, high) + ("" if uniform or pd.isna(n) else f" (n={int(n)})")
            for mean, low, high, n in zip(
                table[column], table[f"{column} low"], table[f"{column} high"], counts, strict=True
            )
        ]
        if uniform and counts.notna().any():
            shown = shown.rename(columns={column: f"{column} (n={int(counts.dropna().iloc[0])})"})
    return markdown(shown)
