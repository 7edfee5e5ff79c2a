"""How a run that stops early reports it: one sentence and an exit status, never a traceback.

Bad input raises a ``ValueError`` (or an ``OSError`` from the file system, or one of Hydra's and
OmegaConf's own errors) somewhere before any work starts; :func:`one_line_errors` turns it into
one line on stderr and exit status 1. An interrupt (Ctrl-C, exit status 130) or a SIGTERM (exit
status 143, as a shell reports a process that SIGTERM ended) gets one line saying what was saved
and how to resume. Anything else is a bug in the harness and keeps its traceback.
"""

from __future__ import annotations

import difflib
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    OverrideParseException,
)
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

log = logging.getLogger(__name__)

INTERRUPTED = 130  # 128 + SIGINT
TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (see :func:`stop_on_sigterm`).

    A ``BaseException`` like ``KeyboardInterrupt``, so that ``finally`` blocks (closing the
    example log, writing the metrics of the rows so far) run and no ``except Exception`` keeps
    the run going.
    """


def stop_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` instead of ending the process on the spot."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)


def one_sentence(text: str) -> str:
    """Join the lines of a multi-line message into one."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def unknown_key_message(error: ConfigCompositionException) -> str:
    """``buget=5``: Hydra's "Could not override 'buget'" as one sentence with a suggestion."""
    cause = error.__cause__
    key = getattr(cause, "full_key", None) if isinstance(cause, OmegaConfBaseException) else None
    if not key:
        return one_sentence(error)
    parent, _, name = key.rpartition(".")
    node = getattr(cause, "parent_node", None)
    known = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    return (
        f"unknown config key {key!r}; {hint}check its spelling"
        " (python run.py --cfg job lists every key)."
    )


def explain(error: BaseException) -> str | None:
    """One sentence for an error a user can fix, or None for a bug in the harness.

    Parameters
    ----------
    error : BaseException
        What a run raised; Hydra's ``InstantiationException`` is unwrapped to its cause.

    Returns
    -------
    str or None
        The message (without the ``error:`` prefix).
    """
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, ConfigCompositionException):
        return unknown_key_message(error)
    if isinstance(error, OverrideParseException):
        return (
            f"could not read the command line ({one_sentence(error).split(' See ')[0]}); "
            "write overrides as key=value, lists as key=[a,b]."
        )
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key or "a config key"
        return f"{key} has no value; pass {key}=... on the command line."
    if isinstance(error, OmegaConfBaseException):
        return f"the config could not be read: {one_sentence(error)}"
    if isinstance(error, ValueError | FileNotFoundError):
        return one_sentence(error)
    if isinstance(error, OSError):
        where = f" {error.filename}" if error.filename else ""
        return (
            f"could not write or read{where}: {error.strerror or error}; check that the folder "
            "exists, is writable and has free space."
        )
    return None


def interrupted_message(error: BaseException, results_dir: str | Path | None) -> str:
    """What an interrupted run kept, and how to go on."""
    how = "interrupted by Ctrl-C" if isinstance(error, KeyboardInterrupt) else "stopped by SIGTERM"
    if results_dir is None:
        return f"{how} before any example ran; nothing was written."
    runs = Path(results_dir, "runs")
    return (
        f"{how}: every finished example is saved in its run folder under {runs}; run the same "
        "command again to resume where it stopped."
    )


@contextmanager
def one_line_errors(results_dir: str | Path | None = None) -> Iterator[None]:
    """Report bad input and interrupts raised inside the block as one line and exit.

    Parameters
    ----------
    results_dir : str or Path, optional
        Where the run writes, named by the interrupt message; None before the run started.
    """
    try:
        yield
    except (KeyboardInterrupt, Terminated) as stop:
        print(interrupted_message(stop, results_dir), file=sys.stderr)
        sys.exit(INTERRUPTED if isinstance(stop, KeyboardInterrupt) else TERMINATED)
    except Exception as error:
        message = explain(error)
        if message is None:
            raise
        log.debug("bad input", exc_info=error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
