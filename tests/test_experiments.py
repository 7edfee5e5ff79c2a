"""Every experiment of experiments/ composes into a sweep over known methods and budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from capkv.cli import CONF_DIR, group_options, plain_experiment


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_composes(experiment):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    assert set(cfg.methods) <= set(group_options("method"))
    assert cfg.ratios or cfg.budgets or list(cfg.methods) == ["full"]


def test_experiment_is_chosen_without_a_plus_and_the_plus_still_works():
    assert plain_experiment(["+experiment=ruler", "+foo=1", "budget=5"]) == [
        "experiment=ruler",
        "+foo=1",
        "budget=5",
    ]


def test_experiments_write_the_committed_results_and_other_runs_an_ignored_folder():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = compose("config").results_dir
        experiments = {
            name: compose("config", overrides=[f"experiment={name}"]).results_dir
            for name in group_options("experiment")
        }
    ignored = (CONF_DIR.parent / ".gitignore").read_text().split()
    assert f"{Path(default).parts[0]}/" in ignored
    assert all(Path(folder).parts[0] == "results" for folder in experiments.values())
