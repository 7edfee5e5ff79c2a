"""LongBench's official ``data.zip`` from the Hugging Face hub, downloaded and unpacked once.

The hub repository (``zai-org/LongBench``, formerly ``THUDM/LongBench``) holds a loading script
that ``datasets`` 4 and newer refuse to run, and the file ``data.zip`` with every dataset as
``data/<dataset>.jsonl``. We fetch that file with :func:`huggingface_hub.hf_hub_download` (which
keeps it in the Hugging Face cache and honours ``HF_ENDPOINT``, ``HF_HOME`` and
``HF_HUB_OFFLINE``) and unpack its JSONL files, flat, into the project's cache::

    $CAPKV_CACHE/data/longbench/zai-org--LongBench/   (or ~/.cache/capkv/...)
        2wikimqa.jsonl  ...  trec_e.jsonl  manifest.json

The folder is then read like any ``task.data_dir`` (:func:`capkv.tasks.longbench.data.read_jsonl`).

Once, atomically, and checked on use:

- ``huggingface_hub`` downloads the file once however many jobs ask at the same time (its own
  lock on the file), then one process unpacks while the others wait on a lock beside the folder
  (:func:`capkv.storage.locking.locked`, released by the kernel if the holder dies) and find
  the folder made: a SLURM array downloads and unpacks once; a failed download writes nothing
  of ours;
- the unpack is written into a temporary sibling folder, ``manifest.json`` (each file's size and
  SHA-256) last, then renamed into place in one step: a killed unpack leaves only a temporary
  folder, which the next unpack removes, never a half folder that a run would trust;
- a folder that exists is used without asking the hub (offline use needs nothing else), after
  checking the files a run reads against the manifest; a damaged one is refused in one line
  saying to delete it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from capkv.models.cache import cache_root
from capkv.storage.folders import sha256_of
from capkv.storage.locking import locked

HUB_REPO = "zai-org/LongBench"
ZIP_FILE = "data.zip"
MANIFEST = "manifest.json"
CACHE_SUBDIR = Path("data") / "longbench"
_MEMBER = re.compile(r"^data/([A-Za-z0-9_.-]+\.jsonl)$")
_UNPACKING = ".unpacking-"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """What the manifest says of one unpacked file.

    Attributes
    ----------
    size : int
        Bytes.
    sha256 : str
        Hex digest of its content.
    """

    size: int
    sha256: str


def unpack_folder(repo: str) -> Path:
    """The cache folder the JSONL files of ``repo``'s ``data.zip`` are unpacked into.

    Parameters
    ----------
    repo : str
        Hub dataset id, ``owner/name``.

    Returns
    -------
    Path
        ``<cache root>/data/longbench/<owner>--<name>`` (:func:`capkv.models.cache.cache_root`).
    """
    return cache_root() / CACHE_SUBDIR / repo.replace("/", "--")


def _copy_hashed(source: IO[bytes], target: Path) -> FileEntry:
    """Copy an open binary stream into ``target`` (flushed to disk), hashing it on the way."""
    digest, size = hashlib.sha256(), 0
    with target.open("wb") as out:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return FileEntry(size, digest.hexdigest())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unpack(zip_path: Path, folder: Path, repo: str) -> None:
    """Unpack the ``data/*.jsonl`` members of ``zip_path`` into ``folder``, atomically.

    The files and ``manifest.json`` are written into a temporary sibling of ``folder``, which is
    renamed to ``folder`` once complete; on any error the temporary folder is removed and
    ``folder`` is not created. The caller holds the folder's lock.

    Parameters
    ----------
    zip_path : Path
        LongBench's ``data.zip``.
    folder : Path
        Where the files go; must not exist.
    repo : str
        The hub repository the zip came from (recorded in the manifest, named in errors).

    Raises
    ------
    ValueError
        If the file is not a readable zip archive, or holds no ``data/<dataset>.jsonl``.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f"{folder.name}{_UNPACKING}*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed unpack (we hold the lock)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}{_UNPACKING}", dir=folder.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = [
                    (info, match.group(1))
                    for info in archive.infolist()
                    if (match := _MEMBER.match(info.filename)) and not info.is_dir()
                ]
                if not members:
                    raise ValueError(
                        f"{zip_path} (data.zip of {repo}) holds no data/<dataset>.jsonl file, so "
                        f"it is not LongBench's data.zip; set task.hub_repo={HUB_REPO} or pass "
                        "task.data_dir=<folder of official JSONL files>."
                    )
                entries = {}
                for info, name in members:
                    with archive.open(info) as source:
                        entries[name] = _copy_hashed(source, tmp / name)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
            raise ValueError(
                f"{zip_path} (data.zip of {repo}) is not a readable zip archive ({error}); delete "
                f"{zip_path.resolve()}, a damaged download, and run again to download it afresh."
            ) from None
        manifest = {
            "repo": repo,
            "zip": ZIP_FILE,
            "files": {name: vars(entry) for name, entry in sorted(entries.items())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        tmp.chmod(0o777 & ~_umask())
        _fsync_folder(tmp)
        os.rename(tmp, folder)
        _fsync_folder(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_manifest(folder: Path) -> dict[str, FileEntry]:
    """The files ``manifest.json`` of an unpacked folder lists.

    Parameters
    ----------
    folder : Path
        An unpacked folder (:func:`unpack`).

    Returns
    -------
    dict[str, FileEntry]
        File name -> size and digest.

    Raises
    ------
    ValueError
        If the manifest is missing or is not what :func:`unpack` writes.
    """
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        return {name: FileEntry(int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(
            f"The cached LongBench folder {folder} has no readable {MANIFEST} (a damaged or "
            f"foreign unpack); delete {folder} and run again to unpack data.zip afresh."
        ) from None


def verify(folder: Path, names: list[str], repo: str) -> None:
    """Check the files a run reads against the folder's manifest.

    Parameters
    ----------
    folder : Path
        An unpacked folder.
    names : list[str]
        File names, e.g. ``["qasper.jsonl", "trec_e.jsonl"]``.
    repo : str
        The hub repository (named in errors).

    Raises
    ------
    ValueError
        If a file is not in the zip (the dataset does not exist there), or is missing, of
        another size or another content than when it was unpacked.
    """
    manifest = read_manifest(folder)
    for name in names:
        if name not in manifest:
            raise ValueError(
                f"{name} is not in data.zip of {repo} (unpacked at {folder}); drop "
                f"{name.removesuffix('.jsonl')} from task.datasets or set task.hub_repo to a "
                "repository whose data.zip has it."
            )
        path, entry = folder / name, manifest[name]
        size = path.stat().st_size if path.is_file() else None
        if size != entry.size or sha256_of(path) != entry.sha256:
            found = (
                "is missing"
                if size is None
                else f"has {size} bytes"
                if size != entry.size
                else "has changed"
            )
            raise ValueError(
                f"The cached LongBench file {path} is damaged (it {found}; the manifest says "
                f"{entry.size} bytes of SHA-256 {entry.sha256[:12]}...); delete {folder} and run "
                "again to unpack data.zip afresh."
            )


def download(repo: str) -> Path:
    """``data.zip`` of ``repo``, from the Hugging Face cache or the hub.

    Parameters
    ----------
    repo : str
        Hub dataset id.

    Returns
    -------
    Path
        The file in the Hugging Face cache.

    Raises
    ------
    ValueError
        In one line, if the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set) and the file is
        not cached, or the repository or its ``data.zip`` does not exist.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"the hub ({constants.ENDPOINT})"
    fallback = "or pass task.data_dir=<folder of official JSONL files>"

    def out_of_reach(reason: str) -> ValueError:
        return ValueError(
            f"LongBench's {ZIP_FILE} of {repo} is neither unpacked in {unpack_folder(repo)} nor "
            f"in the Hugging Face cache, and {where} is out of reach ({reason}); run once where "
            f"the hub is reachable (the cache then serves offline runs), {fallback}."
        )

    try:
        return Path(hf_hub_download(repo_id=repo, filename=ZIP_FILE, repo_type="dataset"))
    except LocalEntryNotFoundError:
        offline = constants.HF_HUB_OFFLINE
        raise out_of_reach("HF_HUB_OFFLINE is set" if offline else "it cannot be reached") from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{where[0].upper()}{where[1:]} has no dataset repository {repo}; set "
            f"task.hub_repo={HUB_REPO} (the "
            f"official one), {fallback}."
        ) from None
    except EntryNotFoundError:
        raise ValueError(
            f"The dataset repository {repo} on {where} has no {ZIP_FILE}; set "
            f"task.hub_repo={HUB_REPO} (the official one), {fallback}."
        ) from None
    except HfHubHTTPError as error:
        raise ValueError(
            f"Downloading {ZIP_FILE} of {repo} from {where} failed ({_first_line(error)}); run "
            f"again, {fallback}."
        ) from None
    except Exception as error:  # the transport errors of the http client huggingface_hub uses
        raise out_of_reach(f"{type(error).__name__}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def hub_data_dir(repo: str, names: list[str]) -> Path:
    """The folder of LongBench's official JSONL files, downloaded and unpacked on first use.

    Parameters
    ----------
    repo : str
        Hub dataset id holding ``data.zip`` (``task.hub_repo``).
    names : list[str]
        The JSONL files the run reads; checked against the manifest.

    Returns
    -------
    Path
        The unpacked folder, to read like ``task.data_dir``.

    Raises
    ------
    ValueError
        In one line, for an unreachable hub without a cache, a zip without the expected files,
        a damaged unpack or a dataset the zip lacks (see :func:`download`, :func:`unpack`,
        :func:`verify`).
    """
    folder = unpack_folder(repo)
    if not folder.exists():
        zip_path = download(repo)  # concurrent jobs: huggingface_hub downloads it once
        with locked(folder.parent / f"{folder.name}.lock"):
            if not folder.exists():  # another job may have unpacked it while we waited
                unpack(zip_path, folder, repo)
    verify(folder, names, repo)
    return folder
