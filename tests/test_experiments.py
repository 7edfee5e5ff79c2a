"""Every experiment of experiments/ composes into a sweep over known methods and budgets."""

from __future__ import annotations

import re
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


def test_make_reproduce_writes_the_committed_results_and_other_runs_an_ignored_folder():
    makefile = (CONF_DIR.parent / "Makefile").read_text()
    reproduce = makefile.split("\nreproduce:", 1)[1].split("\n\n", 1)[0]
    committed = set(re.findall(r"experiment=(\w+)", reproduce))
    assert committed == {"needle_heatmaps", "needle_context_limit", "ruler"}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        folders = {
            name: compose("config", overrides=[f"experiment={name}"]).results_dir
            for name in group_options("experiment")
        }
        folders["(no experiment)"] = compose("config").results_dir
    ignored = (CONF_DIR.parent / ".gitignore").read_text().split()
    for name, folder in folders.items():
        top = Path(folder).parts[0]
        assert top == "results" if name in committed else f"{top}/" in ignored, (name, folder)
