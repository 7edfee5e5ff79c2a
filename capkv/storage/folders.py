"""Folders the harness builds once and trusts afterwards (a converted model, unpacked data):
built in a temporary sibling, sealed with a manifest of every file's size and SHA-256, and
renamed into place under a lock; every later use checks the manifest first.

A folder is either absent, complete and intact, or detected as damaged (a file missing, cut
short, changed, or no manifest at all: a conversion killed before the rename never leaves one):
:func:`folder_damage` says which, in words, and :func:`publish_folder` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from capkv.storage.locking import locked

MANIFEST = ".manifest.json"
_CHUNK = 1 << 22


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (recursively, the manifest left out), relative to it."""
    return sorted(
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.is_file() and path.name != MANIFEST
    )


def write_manifest(folder: Path) -> dict[str, dict[str, int | str]]:
    """Seal ``folder``: write the size and SHA-256 of each of its files into its manifest."""
    entries = {
        str(name): {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
        for name in folder_files(folder)
    }
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")
    return entries


def folder_damage(folder: Path) -> str | None:
    """What is wrong with a sealed folder, in a few words, or None when it is intact.

    Sizes are compared first (cheap, and what a copy cut short or a full disk changes), then
    every file's SHA-256.

    Parameters
    ----------
    folder : Path
        A folder written by :func:`publish_folder` (or sealed by :func:`write_manifest`).

    Returns
    -------
    str or None
        ``"it does not exist"``, ``"it has no manifest (an unfinished or older write)"``,
        ``"model.safetensors is 1024 bytes, expected 2048"``, ... ; None if intact.
    """
    if not folder.is_dir():
        return "it does not exist"
    try:
        entries = json.loads((folder / MANIFEST).read_text())["files"]
        if not isinstance(entries, dict):
            raise TypeError
    except FileNotFoundError:
        return f"it has no {MANIFEST} (an unfinished or older write)"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {MANIFEST} is damaged"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} is {size} bytes, expected {entry.get('size')}"
    for name, entry in entries.items():
        if sha256_of(folder / name) != entry.get("sha256"):
            return f"{name} differs from what was written (SHA-256)"
    return None


def publish_folder(dest: Path, build: Callable[[Path], None], lock: Path | None = None) -> bool:
    """Make ``dest`` an intact folder built by ``build``, unless it already is one.

    Under the lock (processes starting together build once; the others wait, then find it
    intact), ``build`` fills a temporary sibling of ``dest``, which is sealed, checked and
    renamed into place; a damaged ``dest`` is moved aside and deleted first. A build that fails
    or is killed leaves only a ``.<name>.tmp-*`` folder, never a half-written ``dest``.

    Parameters
    ----------
    dest : Path
        The folder to publish.
    build : callable
        ``build(folder)`` writes the folder's files into ``folder`` (which exists, empty).
    lock : Path, optional
        The lock file; ``.<name>.lock`` beside ``dest`` by default.

    Returns
    -------
    bool
        Whether this call built the folder (False: it was intact already).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = lock or dest.parent / f".{dest.name}.lock"
    with locked(lock):
        if folder_damage(dest) is None:
            lock.unlink(missing_ok=True)  # built by another process meanwhile
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            build(tmp)
            write_manifest(tmp)
            damage = folder_damage(tmp)
            if damage is not None:
                raise OSError(f"{tmp} was damaged while it was written: {damage}")
            if dest.exists() or dest.is_symlink():
                aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.damaged-", dir=dest.parent))
                os.replace(dest, aside / dest.name)
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(tmp, dest)
            # Safe to remove now: every process from here on finds the folder intact.
            lock.unlink(missing_ok=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True
