"""Run one benchmark cell, or a sweep with -m: python run.py method=capkv budget=512."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from capkv.harness.cli import check_group_choices, in_multirun, plain_experiment, run_from_config
from capkv.harness.errors import one_line_errors, stop_on_sigterm


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if in_multirun():
        run_from_config(
            cfg
        )  # a multirun reports each failed job in one line (capkv.harness.callbacks)
        return
    with one_line_errors(results_dir=cfg.results_dir):
        run_from_config(cfg)


if __name__ == "__main__":
    # Hydra's own errors (a misspelt key, an unreadable override) reach one_line_errors instead
    # of being printed by Hydra over several lines.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    stop_on_sigterm()
    sys.argv[1:] = plain_experiment(sys.argv[1:])
    with one_line_errors():
        check_group_choices(sys.argv[1:])
        main()
