"""LongBench from the hub, end to end against a local stand-in of the Hugging Face hub.

The stand-in serves a ``data.zip`` built from the fixtures in the official layout
(``data/<dataset>.jsonl``, ``data/<dataset>_e.jsonl``) over http on 127.0.0.1, answering the two
requests ``huggingface_hub.hf_hub_download`` makes (``HEAD`` then ``GET`` of
``/datasets/<repo>/resolve/<revision>/data.zip``, with the headers it reads: ``X-Repo-Commit``,
``ETag``, ``Content-Length``; ``X-Error-Code`` on a 404). Runs are fresh processes with
``HF_ENDPOINT`` pointing at it: nothing of the download, the unpack or the reader is mocked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from capkv.tasks.longbench.hub import MANIFEST, unpack

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "longbench"
OFFICIAL = "zai-org/LongBench"


def official_zip(skip: tuple[str, ...] = (), extra: dict[str, bytes] | None = None) -> bytes:
    """A data.zip in the official layout, of every fixture file but ``skip``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data/", b"")
        for path in sorted(FIXTURES.glob("*.jsonl")):
            if path.stem not in skip:
                archive.write(path, f"data/{path.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def readme_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("README.md", b"no data here\n")
    return buffer.getvalue()


class StandInHub:
    """The dataset repositories a test serves: repo id -> {file name: bytes}."""

    def __init__(self, repos: dict[str, dict[str, bytes]], delay: float = 0.0) -> None:
        self.repos = repos
        self.delay = delay  # seconds before a GET's body: concurrent jobs overlap the download
        self.gets: Counter[str] = Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: bool) -> None:
                parts = self.path.split("?")[0].split("/")
                # /datasets/<owner>/<name>/resolve/<revision>/<file>
                if len(parts) != 7 or parts[1] != "datasets" or parts[4] != "resolve":
                    return self._missing("RepoNotFound")
                repo, filename = f"{parts[2]}/{parts[3]}", parts[6]
                if repo == "down/LongBench":  # a hub that drops the connection
                    self.close_connection = True
                    self.connection.close()
                    return None
                if repo not in hub.repos:
                    return self._missing("RepoNotFound")
                if filename not in hub.repos[repo]:
                    return self._missing("EntryNotFound")
                data = hub.repos[repo][filename]
                self.send_response(200)
                self.send_header("X-Repo-Commit", hashlib.sha1(data).hexdigest())
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/zip")
                self.end_headers()
                if body:
                    hub.gets[repo] += 1
                    time.sleep(hub.delay)
                    self.wfile.write(data)
                return None

            def _missing(self, code: str) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

        return Handler

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def hub_env(tmp: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    """The environment of a fresh process that sees only the stand-in hub and tmp caches."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp / "hf"),
        CAPKV_CACHE=str(tmp / "capkv"),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="5",
        NO_PROXY="127.0.0.1",
        PYTHONPATH=str(ROOT),
    )
    env.pop("HF_TOKEN", None)
    return env


# Builds the task from the hub and prints its examples (id, context, question) as JSON.
READ = """
import json, sys
from capkv.tasks.longbench import LongBench
from tests.tasks.test_longbench import byte_tokenizer
kwargs = json.loads(sys.argv[1])
task = LongBench(**kwargs)
rows = [[e.example_id, e.context, e.question, e.metadata] for e in task.examples(byte_tokenizer(), 10**6)]
print(json.dumps(rows))
"""


def read_task(
    tmp: Path, endpoint: str, offline: bool = False, **kwargs: object
) -> subprocess.Popen:
    """A fresh process building ``LongBench(**kwargs)`` from the hub and printing its examples."""
    return subprocess.Popen(
        [sys.executable, "-c", READ, json.dumps(kwargs)],
        cwd=ROOT,
        env=hub_env(tmp, endpoint, offline),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> list:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out)


def local_examples(**kwargs: object) -> list:
    from capkv.tasks.longbench import LongBench
    from tests.tasks.test_longbench import byte_tokenizer

    task = LongBench(data_dir=str(FIXTURES), **kwargs)
    return [
        [e.example_id, e.context, e.question, e.metadata]
        for e in task.examples(byte_tokenizer(), 10**6)
    ]


def unpacked(tmp: Path, repo: str = OFFICIAL) -> Path:
    return tmp / "capkv" / "data" / "longbench" / repo.replace("/", "--")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, StandInHub]]:
    """Three jobs at once loading LongBench and LongBench-E from the stand-in hub; its caches."""
    tmp = tmp_path_factory.mktemp("hub")
    with StandInHub({OFFICIAL: {"data.zip": official_zip()}}, delay=1.0) as hub:
        jobs = [
            read_task(tmp, hub.url, datasets=["qasper", "trec", "lcc"]),
            read_task(tmp, hub.url, datasets=["trec", "lcc"], variant="e"),
            read_task(tmp, hub.url),
        ]
        outputs = [finish(job) for job in jobs]
        yield tmp, hub, outputs


def test_many_jobs_download_once_unpack_once_and_read_what_data_dir_reads(hub_cache) -> None:
    tmp, hub, (three, e_rows, every) = hub_cache
    assert hub.gets == Counter({OFFICIAL: 1})
    assert three == local_examples(datasets=["qasper", "trec", "lcc"])
    assert e_rows == local_examples(datasets=["trec", "lcc"], variant="e")
    assert every == local_examples()
    folder = unpacked(tmp)
    files = {path.name for path in FIXTURES.glob("*.jsonl")}
    assert {path.name for path in folder.iterdir()} == files | {MANIFEST}
    for name in files:
        assert (folder / name).read_bytes() == (FIXTURES / name).read_bytes()
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, f"{folder.name}.lock"]


def test_offline_jobs_read_the_cache_without_the_hub(hub_cache) -> None:
    tmp, hub, _ = hub_cache
    dead = "http://127.0.0.1:9"  # nothing listens there
    rows = finish(read_task(tmp, dead, offline=True, datasets=["samsum"], variant="e"))
    assert rows == local_examples(datasets=["samsum"], variant="e")
    assert [row[3]["length_bucket"] for row in rows] == ["0-4k", "4-8k", "8k+"]
    # without the unpacked folder, the Hugging Face cache serves the zip offline
    other = tmp / "elsewhere"
    (other / "hf").parent.mkdir(exist_ok=True)
    os.symlink(tmp / "hf", other / "hf")
    rows = finish(read_task(other, dead, offline=True, datasets=["hotpotqa"]))
    assert rows == local_examples(datasets=["hotpotqa"])
    assert hub.gets == Counter({OFFICIAL: 1})


def test_the_hub_module_prepares_the_cache_for_offline_nodes(hub_cache) -> None:
    # on a login node before a SLURM array: download and unpack once, print the folder
    tmp, _, _ = hub_cache
    command = [sys.executable, "-m", "capkv.tasks.longbench"]
    env = hub_env(tmp, "http://127.0.0.1:9", offline=True)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(unpacked(tmp))
    env["CAPKV_CACHE"] = str(tmp / "empty")
    env["HF_HOME"] = str(tmp / "empty-hf")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: LongBench's data.zip of zai-org/LongBench is neither")
    assert "(HF_HUB_OFFLINE is set)" in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_run_from_the_hub_writes_its_results(hub_cache) -> None:
    tmp, _, _ = hub_cache
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "model=tiny-random",
        "task=longbench_e",
        "task.datasets=[trec,passage_count]",
        "method=snapkv",
        "budget=64",
        f"results_dir={tmp / 'results'}",
    ]
    env = hub_env(tmp, "http://127.0.0.1:9", offline=True)
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (examples,) = (tmp / "results").rglob("examples.jsonl")
    rows = [json.loads(line) for line in examples.read_text().splitlines()]
    assert [row["metadata"]["length_bucket"] for row in rows] == ["0-4k", "4-8k", "8k+"] * 2
    assert "longbench_e" in examples.parts


# ---------------------------------------------------------------- refused in one line

# Runs run.py's __main__ block once per case inside one interpreter (the imports take seconds);
# each case sets CAPKV_CACHE; prints one JSON line per case: exit status and stderr.
DRIVER = """
import contextlib, io, json, os, runpy, sys
root, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
for cache, overrides in cases:
    os.environ["CAPKV_CACHE"] = cache
    sys.argv = [sys.argv[0], *overrides]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(root + "/run.py", run_name="__main__")
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 1
    print(json.dumps({"status": status, "stderr": stderr.getvalue()}), flush=True)
"""

BASE = ["model=tiny-random", "method=full", "task=longbench", "task.datasets=[qasper]"]
# name -> (hub repo, extra overrides, what the one line says; {cache} is the case's unpack folder)
BAD_HUB = {
    "unknown variant": (OFFICIAL, ["task.variant=x"], "task.variant='x' is not a LongBench"),
    "dataset not in the variant": (
        OFFICIAL,
        ["task.variant=e", "task.datasets=[narrativeqa]"],
        "Unknown LongBench-E dataset(s) ['narrativeqa']",
    ),
    "hub down, no cache": ("down/LongBench", [], "and the hub (http://127.0.0.1:"),
    "no such repository": ("nobody/LongBench", [], "has no dataset repository nobody/LongBench"),
    "repository without data.zip": ("empty/LongBench", [], "has no data.zip"),
    "zip without data files": ("readme/LongBench", [], "holds no data/<dataset>.jsonl file"),
    "not a zip": ("garbage/LongBench", [], "is not a readable zip archive"),
    "dataset missing from the zip": (
        "partial/LongBench",
        [],
        "qasper.jsonl is not in data.zip of partial/LongBench (unpacked at {cache})",
    ),
    "truncated cached file": (OFFICIAL, [], "The cached LongBench file {cache}/qasper.jsonl is"),
    "edited cached file": (OFFICIAL, [], "(it has changed; the manifest says"),
    "unpack without manifest": (OFFICIAL, [], "{cache} has no readable manifest.json"),
}
WRITES_NOTHING = {"hub down, no cache", "no such repository", "repository without data.zip"}
DAMAGED = {"truncated cached file", "edited cached file", "unpack without manifest"}
REFUSED_ZIPS = {"zip without data files", "not a zip"}


def damage(folder: Path, name: str) -> None:
    """Unpack the official zip into ``folder``, then damage it as case ``name`` says."""
    zip_path = folder.parent.parent / "official.zip"
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    zip_path.write_bytes(official_zip())
    unpack(zip_path, folder, OFFICIAL)
    qasper = folder / "qasper.jsonl"
    if name == "truncated cached file":
        qasper.write_bytes(qasper.read_bytes()[:-10])
    elif name == "edited cached file":
        data = qasper.read_bytes()
        qasper.write_bytes(data[:-2] + b"X\n")
    else:
        (folder / MANIFEST).unlink()


@pytest.fixture(scope="module")
def hub_refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    tmp = tmp_path_factory.mktemp("hub_refusals")
    repos = {
        OFFICIAL: {"data.zip": official_zip()},
        "empty/LongBench": {"README.md": b"nothing else\n"},
        "readme/LongBench": {"data.zip": readme_zip()},
        "garbage/LongBench": {"data.zip": b"this is not a zip archive\n"},
        "partial/LongBench": {"data.zip": official_zip(skip=("qasper",))},
    }
    cases, folders = [], {}
    for i, (name, (repo, extra, _)) in enumerate(BAD_HUB.items()):
        cache = tmp / f"case{i}"
        folders[name] = cache
        if name in DAMAGED:
            damage(cache / "data" / "longbench" / repo.replace("/", "--"), name)
        overrides = [*BASE, f"task.hub_repo={repo}", *extra, f"results_dir={cache / 'results'}"]
        cases.append((str(cache), overrides))
    with StandInHub(repos) as hub:
        env = hub_env(tmp, hub.url)
        result = subprocess.run(
            [sys.executable, "-c", DRIVER, str(ROOT), json.dumps(cases)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(outcomes) == len(BAD_HUB), result.stderr[-3000:]
    return {name: (outcomes[i], folders[name]) for i, name in enumerate(BAD_HUB)}


@pytest.mark.parametrize("name", sorted(BAD_HUB))
def test_each_bad_hub_input_is_refused_in_one_line_writing_nothing(hub_refusals, name) -> None:
    outcome, cache = hub_refusals[name]
    repo, _, message = BAD_HUB[name]
    folder = cache / "data" / "longbench" / repo.replace("/", "--")
    lines = outcome["stderr"].strip().splitlines()
    assert outcome["status"] == 1
    assert len(lines) == 1, outcome["stderr"]
    assert lines[0].startswith("error: ")
    assert message.format(cache=folder) in lines[0]
    assert not (cache / "results").exists()
    if name in WRITES_NOTHING:
        assert not cache.exists()
    if name in REFUSED_ZIPS:  # neither an unpacked folder nor a temporary one is left
        assert [p.name for p in folder.parent.iterdir()] == [f"{folder.name}.lock"]
    if name == "not a zip":  # the blob of the Hugging Face cache, which is what to delete
        assert "/datasets--garbage--LongBench/blobs/" in lines[0]


# ---------------------------------------------------------------- atomic unpack


def test_a_killed_unpack_leaves_no_folder_that_a_later_run_trusts(tmp_path: Path) -> None:
    zip_path = tmp_path / "data.zip"
    big = b"{}\n" * (60 << 20)  # 180 MB of lines: the unpack takes long enough to be killed
    zip_path.write_bytes(official_zip(extra={"data/zz_big.jsonl": big}))
    folder = tmp_path / "cache" / "zai-org--LongBench"
    script = (
        "import sys; from pathlib import Path; from capkv.tasks.longbench.hub import unpack; "
        "unpack(Path(sys.argv[1]), Path(sys.argv[2]), 'zai-org/LongBench')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, "-c", script, str(zip_path), str(folder)], env=env)
    deadline = time.monotonic() + 120
    while not any(folder.parent.glob("*.unpacking-*/zz_big.jsonl")):
        assert job.poll() is None and time.monotonic() < deadline, "the unpack ended too soon"
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not folder.exists()
    (stale,) = folder.parent.glob("*.unpacking-*")
    unpack(zip_path, folder, OFFICIAL)  # the next unpack removes what the killed one left
    assert not stale.exists()
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["files"]["zz_big.jsonl"]["size"] == len(big)
    assert (folder / "trec.jsonl").read_bytes() == (FIXTURES / "trec.jsonl").read_bytes()


def test_an_interrupted_unpack_removes_its_temporary_folder(tmp_path, monkeypatch) -> None:
    from capkv.tasks.longbench import hub

    zip_path = tmp_path / "data.zip"
    zip_path.write_bytes(official_zip())
    calls = []

    def interrupted(source, target):
        calls.append(target)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(source, target)

    real = hub._copy_hashed
    monkeypatch.setattr(hub, "_copy_hashed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        unpack(zip_path, tmp_path / "cache" / "x", OFFICIAL)
    assert list((tmp_path / "cache").iterdir()) == []
