"""The harness: what plans and runs jobs (the Hydra entry point, input checks, the runner, sweep
mode, shards, launchers and multirun callbacks).

The top of the package beside figures: may import every layer below it (engine, methods,
analysis, tasks, results, storage, models); nothing below imports it.
"""
