"""Figures and per-task tables drawn from the tables under ``results/`` alone (``make figures``).

One module per kind of output; a new figure goes in a module of its own beside them, drawing
from the tables :mod:`capkv.figures.data` reads and styled by :mod:`capkv.figures.style`:

- :mod:`~capkv.figures.heatmaps`: needle heatmaps (context length x depth), per run and as grids;
- :mod:`~capkv.figures.curves`: score against budget, one panel per task family;
- :mod:`~capkv.figures.capacity`: score against retained capacity and attention error;
- :mod:`~capkv.figures.perplexity`: perplexity against position, one panel per budget;
- :mod:`~capkv.figures.turns`: score against question index of the shared-context runs, one
  panel per budget;
- :mod:`~capkv.figures.tables`: per-task tables (subtasks as columns);
- :mod:`~capkv.figures.allocation`: CapKV's allocation per (layer, KV head) beside PyramidKV's
  schedule, from the table ``scripts/allocation_map.py`` writes under ``results/allocation/``;
- :mod:`~capkv.figures.long_generation`: continuations under a bound against the full cache's,
  by budget, from ``long_generation.csv``;
- :mod:`~capkv.figures.style`: each method's colour, marker and name, budget names and order;
- :mod:`~capkv.figures.canvas`: figures on the Agg canvas, panel grids, parallel rendering;
- :mod:`~capkv.figures.data`: reading the tables, refusing missing or stale ones;
- :mod:`~capkv.figures.cli`: ``python -m capkv.figures [--results results] [--plots plots]``.

Drawing never rewrites ``results/``: ``make tables`` (``python -m capkv.results``) builds the
tables from the run folders first.
"""
