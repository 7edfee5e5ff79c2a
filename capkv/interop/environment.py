"""Whether kvpress can run here, and the one sentence that says how to get a working install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import transformers
from packaging.version import Version

KVPRESS_VERSION = "0.5.5"
NEWEST_TRANSFORMERS = "5.3"  # kvpress 0.5.5 requires transformers<5.3
INSTALL = (
    "pip install -e '.[kvpress]', which installs kvpress 0.5.5 with a transformers release from "
    "4.56 to 5.2 (`make test` builds that combination as .venv-oracle)"
)


def kvpress_problem() -> str | None:
    """Why kvpress cannot run in this environment, or None when it can."""
    if Version(transformers.__version__) >= Version(NEWEST_TRANSFORMERS):
        return (
            f"kvpress {KVPRESS_VERSION} needs transformers<{NEWEST_TRANSFORMERS} and this "
            f"environment has transformers {transformers.__version__}"
        )
    if importlib.util.find_spec("kvpress") is None:
        return "kvpress is not installed"
    return None


def import_kvpress(needed_by: str) -> ModuleType:
    """The kvpress module, or a ValueError naming ``needed_by`` and how to install kvpress."""
    problem = kvpress_problem()
    if problem is not None:
        raise ValueError(f"{needed_by} needs kvpress, but {problem}: install it with {INSTALL}.")
    return importlib.import_module("kvpress")
