"""Bad kvpress input to run.py: one line, exit status 1, nothing written (no model loads).

Runs once, in .venv (the Makefile's ONCE list): there kvpress cannot run (transformers 5.24), so
``method=kvpress`` must say how to install a working combination.
"""

from __future__ import annotations

import pytest

from capkv.interop import SUPPORTED_PRESSES, kvpress_problem
from tests.harness.test_run import error_lines, run

SUPPORTED = "choose one of: " + ", ".join(SUPPORTED_PRESSES) + "."
CASES = [
    (["methods=[capkv,kvpress-tovaa]"], "kvpress press 'kvpress-tovaa' is not a kvpress scorer"),
    (["methods=[kvpress-tovaa]"], SUPPORTED),
    (["method=kvpress", "method.press=DuoAttentionPress"], SUPPORTED),
    (["method=kvpress", "method.press=QFilterPress"], "downloads from the Hugging Face hub"),
    (["method=kvpress-tova"], "spelt method=kvpress method.press=TOVAPress"),
    (["method=kvpress"], "method=kvpress needs method.press=<press>; " + SUPPORTED),
    (
        ["method=kvpress", "method.press=ObservedAttentionPress"],
        "pass model.attn_implementation=eager",
    ),
]
if kvpress_problem() is not None:
    CASES.append((["method=kvpress", "method.press=tova"], "install it with pip install -e"))


@pytest.mark.parametrize(("overrides", "message"), CASES)
def test_bad_press_input_gives_one_line(tmp_path, overrides, message):
    result = run(tmp_path, "model=tiny-random", *overrides, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-2000:]
    assert message in lines[0]
    assert not (tmp_path / "results").exists()
