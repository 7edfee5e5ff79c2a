"""Advisory file locks (``fcntl.flock``) that a dead process releases by itself.

Used for one writer per (cell, shard) (non-blocking: a second writer is refused), one writer of a
cell's shared files (``config.yaml``, ``metrics.json``), one rebuild of a results folder's tables
at a time, and one conversion of the SmolLM2 cache (blocking: the others wait a moment). The kernel
drops a flock when its file descriptor closes, so a killed process never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeld(RuntimeError):
    """Another process holds the lock."""


class FileLock:
    """A ``flock`` on ``path`` (created if missing; exclusive unless asked shared), held until
    :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, blocking: bool = True, shared: bool = False) -> FileLock:
        """Take the lock; without ``blocking``, raise :class:`LockHeld` if another holds it.

        With ``shared``, other shared holders are let in (and :func:`is_held` sees them all).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(str(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the ``with`` block, waiting for it if needed."""
    lock = FileLock(path).acquire(blocking=True)
    try:
        yield
    finally:
        lock.release()


def is_held(path: Path) -> bool:
    """Whether another process holds a lock on an existing ``path`` (creates nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
