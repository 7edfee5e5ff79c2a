"""Every experiment of experiments/ composes into a sweep over known methods and budgets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from capkv.harness.cli import CONF_DIR, group_options, plain_experiment
from capkv.interop import SUPPORTED_PRESSES, press_class_name, short_name
from capkv.interop.scorers import NEEDS_ATTENTIONS


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_composes(experiment):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    presses = [m for m in cfg.methods if m.startswith("kvpress-")]
    assert all(press_class_name(m) for m in presses)  # raises for an unknown press
    assert set(cfg.methods) - set(presses) <= set(group_options("method"))
    budgets = [cfg.ratios, cfg.budgets, cfg.kv_fractions, cfg.kv_byte_budgets]
    assert any(budgets) or list(cfg.methods) == ["full"]


def test_the_kvpress_leaderboard_holds_every_supported_press():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=kvpress_leaderboard"])
    runs_with_sdpa = set(SUPPORTED_PRESSES) - set(NEEDS_ATTENTIONS)  # those: a second, eager sweep
    assert {f"kvpress-{short_name(p)}" for p in runs_with_sdpa} <= set(cfg.methods)
    assert {"capkv", "snapkv", "pyramidkv", "h2o", "streamingllm", "full"} <= set(cfg.methods)


def test_experiment_is_chosen_without_a_plus_and_the_plus_still_works():
    assert plain_experiment(["+experiment=ruler", "+foo=1", "budget=5"]) == [
        "experiment=ruler",
        "+foo=1",
        "budget=5",
    ]


def test_make_reproduce_writes_the_committed_results_and_other_runs_an_ignored_folder():
    makefile = (CONF_DIR.parent / "Makefile").read_text()
    targets = re.findall(r"\n(reproduce[\w-]*):[^\n]*\n(.*?)(?:\n\n|$)", makefile, re.S)
    committed_by = {target: set(re.findall(r"experiment=(\w+)", body)) for target, body in targets}
    assert committed_by["reproduce"] == {"needle_heatmaps", "needle_context_limit", "ruler"}
    committed = set().union(*committed_by.values())
    assert {"allocation_needle", "allocation_ruler", "kvpress_leaderboard"} <= committed
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
