"""The project's cache folder: converted models and unpacked benchmark data live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$CAPKV_CACHE`` when set, else ``~/.cache/capkv``; read at each call, never created.

    Returns
    -------
    Path
        The folder; ``models/`` (converted SmolLM2) and ``data/`` (unpacked LongBench) go under it.
    """
    root = os.environ.get("CAPKV_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "capkv"
