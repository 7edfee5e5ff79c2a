"""Files written whole or not at all, and files that grow by whole records: what every layer
that writes an artefact uses."""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written).

    The file gets the permissions a plain ``open`` would give it (0666 less the umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# Signals that raise in Python (Ctrl-C, SIGTERM under the harness's handlers): held back while a
# record is appended, so that none lands between the first byte of a record and its last.
_DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` to the open file ``fd`` whole and synced, or leave the file as it was.

    The file's length is read first; a write that fails part way (``ENOSPC``, ``EIO``, any
    exception raised while the bytes go out) truncates the file back to that length before the
    error goes on, so a reader never sees a torn record. SIGINT and SIGTERM are held back for the
    append (in the main thread) and delivered right after it. A SIGKILL
    or a power cut mid-write is not covered: :func:`capkv.results.store.read_rows` skips a torn
    last line and the next writer rewrites the file without it.

    Parameters
    ----------
    fd : int
        A descriptor opened for writing (``O_APPEND`` or not: the bytes go at the end).
    data : bytes
        One whole record (a row and its newline).

    Raises
    ------
    OSError
        What the failed write or sync raised, after the truncation.
    """
    with signals_deferred():
        length = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, length)
            os.lseek(fd, length, os.SEEK_SET)
            raise


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the ``with`` block and deliver them right after it.

    Blocks nest: a signal held by an inner block is delivered to the outer one's holder, so a
    caller that must note a record as written (in memory) before any interrupt wraps both.

    Python runs signal handlers in the main thread between bytecodes, so the handlers are
    swapped for one that notes the signal (a signal mask would not do: another thread of the
    process, torch's, takes a signal the main thread blocks). Elsewhere than the main thread,
    where handlers cannot be changed, the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for number in _DEFERRED_SIGNALS:
        handler = signal.getsignal(number)
        if handler is not None:
            previous[number] = signal.signal(number, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in pending:
            signal.raise_signal(number)  # to the handler (or default) that was in place


class AppendLog:
    """A file that grows by whole records only (:func:`append_whole`), e.g. a rows file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, text: str) -> None:
        """Append one record (``text``, ending in a newline), whole or not at all."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        append_whole(self._fd, text.encode("utf-8"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
