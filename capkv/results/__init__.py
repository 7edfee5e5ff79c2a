"""Results: the run-folder store, the metrics of each run, and the tables built from them.

May import the engine (budgets), tasks (how a task reports) and storage; never the harness or
figures. ``python -m capkv.results [results]`` rebuilds a folder's tables
(:mod:`capkv.results.tables`); where runs write and how they resume: :mod:`capkv.results.store`.
"""
