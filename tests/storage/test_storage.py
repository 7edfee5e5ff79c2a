"""Faults from the machine at the storage layer (issue 27): rows appended whole or not at all on a
full disk, an I/O error or a signal; sealed folders (a converted model) detected when damaged
and rebuilt, or refused in one line naming the folder to delete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from capkv.models import build_tiny_model, smollm2
from capkv.results.store import ExampleLog, read_rows
from capkv.storage import files
from capkv.storage.folders import MANIFEST, folder_damage, publish_folder, write_manifest

ROOT = Path(__file__).resolve().parents[2]
ROW = {"example_id": "x", "prediction": "y" * 2500}


def row(i: int) -> dict:
    return {**ROW, "example_id": f"ex{i}"}


def whole_rows(path: Path) -> list[dict]:
    """Every line of ``path`` parsed, failing on a torn one."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "a torn last record"
    return [json.loads(line) for line in data.decode().splitlines()]


@contextmanager
def mounted_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a fresh folder (root only; skips the test where mounting
    is refused: the fault-injecting tests cover the same code)."""
    folder = parent / f"disk-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the fault-injecting tests cover the same path")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        timeout=60,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True, timeout=60)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs."""
    with mounted_tmpfs(tmp_path, "64k") as folder:
        yield folder


def test_a_run_filling_its_disk_stops_in_one_line_and_leaves_only_whole_rows(tmp_path):
    """The issue's case end to end: run.py with its results on a 16 KiB disk (one page per
    file: two configs, then rows until the disk is full)."""
    with mounted_tmpfs(tmp_path, "16k") as disk:
        overrides = [
            "model=tiny-random",
            "task.context_lengths=[200,400]",
            "task.depths=[0,50,100]",
        ]
        overrides += ["methods=[capkv,streamingllm]", "budgets=[64]", "task.max_new_tokens=64"]
        result = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *overrides, f"results_dir={disk}/results"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 1, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        files = list((disk / "results").rglob("examples*.jsonl"))
        assert files
        for path in files:
            whole_rows(path)  # every record whole, none torn


def test_a_full_disk_leaves_the_rows_file_ending_at_its_last_whole_row(tiny_disk):
    path = tiny_disk / "examples.jsonl"
    log = ExampleLog(path, [])
    written = 0
    with pytest.raises(OSError) as raised:
        for i in range(1000):
            log.append(row(i))
            written += 1
    log.close()
    assert raised.value.errno == errno.ENOSPC
    assert 0 < written < 1000
    rows = whole_rows(path)
    assert [r["example_id"] for r in rows] == [f"ex{i}" for i in range(written)]
    assert read_rows(path) == rows


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(OSError(errno.ENOSPC, "No space left on device"), id="ENOSPC"),
        pytest.param(OSError(errno.EIO, "Input/output error"), id="EIO"),
        pytest.param(KeyboardInterrupt(), id="a signal"),
    ],
)
def test_an_append_failing_part_way_truncates_back_to_the_previous_row(
    tmp_path, monkeypatch, fault
):
    """A fault-injecting writer: half the row goes out, then the fault."""
    path = tmp_path / "examples.jsonl"
    log = ExampleLog(path, [row(0)])
    before = path.read_bytes()
    real_write = os.write

    def half_then_fault(fd, data):
        if len(data) > 100:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise fault
        return real_write(fd, data)

    monkeypatch.setattr(files.os, "write", half_then_fault)
    with pytest.raises(type(fault)):
        log.append(row(1))
    monkeypatch.setattr(files.os, "write", real_write)
    assert path.read_bytes() == before
    log.append(row(2))  # the log goes on from the previous whole row
    log.close()
    assert [r["example_id"] for r in whole_rows(path)] == ["ex0", "ex2"]


def test_a_sigterm_during_an_append_arrives_after_the_row(tmp_path, monkeypatch):
    import signal

    path = tmp_path / "examples.jsonl"
    log = ExampleLog(path, [])
    real_write = os.write
    received = []

    def signalled_write(fd, data):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the row is going out
        return real_write(fd, data)

    def handler(signum, frame):
        received.append(path.read_bytes())
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    monkeypatch.setattr(files.os, "write", signalled_write)
    try:
        with pytest.raises(KeyboardInterrupt):
            log.append(row(0))
    finally:
        signal.signal(signal.SIGTERM, previous)
        log.close()
    assert received and received[0].endswith(b"\n")  # the row was whole when the signal ran
    assert [r["example_id"] for r in whole_rows(path)] == ["ex0"]


# --------------------------------------------------------------------------- sealed folders


def build_files(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(os.urandom(4096))
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")


def test_a_published_folder_is_sealed_and_leaves_nothing_beside_it(tmp_path):
    dest = tmp_path / "model"
    assert publish_folder(dest, build_files)
    assert folder_damage(dest) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert not publish_folder(dest, lambda folder: pytest.fail("rebuilt an intact folder"))


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (
            lambda d: (d / "weights.bin").write_bytes(b"cut"),
            "weights.bin is 3 bytes, expected 4096",
        ),
        (lambda d: (d / "sub" / "config.json").unlink(), "sub/config.json is missing"),
        (
            lambda d: (d / "sub" / "config.json").write_text("[]"),
            "sub/config.json differs from what was written",
        ),
        (lambda d: (d / MANIFEST).unlink(), "has no .manifest.json"),
        (lambda d: (d / MANIFEST).write_text("{"), "its .manifest.json is damaged"),
    ],
    ids=["cut short", "file missing", "bytes changed", "no manifest", "manifest damaged"],
)
def test_a_damaged_folder_is_detected_and_rebuilt(tmp_path, damage, says):
    dest = tmp_path / "model"
    publish_folder(dest, build_files)
    damage(dest)
    assert says in folder_damage(dest)
    assert publish_folder(dest, build_files)
    assert folder_damage(dest) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_build_killed_part_way_leaves_the_old_folder_and_no_half_written_one(tmp_path):
    dest = tmp_path / "model"

    def dies(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_folder(dest, dies)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]


# --------------------------------------------------------------------------- the SmolLM2 cache


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """SmolLM2's conversion replaced by the tiny model (seconds instead of 20 s); counts calls."""
    calls = []

    def convert(gguf, attn_implementation):
        calls.append(gguf)
        return build_tiny_model(seed=0, attn_implementation=attn_implementation)

    monkeypatch.setattr(smollm2, "_convert_smollm2", convert)
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: tmp_path / "smollm2.gguf")
    monkeypatch.setattr(smollm2, "check_smollm2", lambda config: None)
    return calls


def test_a_converted_model_folder_cut_short_is_converted_again(tmp_path, fake_conversion, caplog):
    cache = tmp_path / "cache" / "smollm2"
    smollm2.load_smollm2(cache)
    assert len(fake_conversion) == 1 and (cache / MANIFEST).is_file()
    smollm2.load_smollm2(cache)
    assert len(fake_conversion) == 1  # intact: loaded, not converted
    weights = cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short, a full disk
    model, tokenizer = smollm2.load_smollm2(cache)
    assert len(fake_conversion) == 2
    assert "model.safetensors is 100 bytes" in caplog.text
    assert folder_damage(cache) is None
    assert [p.name for p in cache.parent.iterdir()] == ["smollm2"]
    assert model.config.num_hidden_layers == build_tiny_model(seed=0)[0].config.num_hidden_layers


def test_a_model_folder_of_the_older_harness_without_manifest_is_converted_again(
    tmp_path, fake_conversion
):
    cache = tmp_path / "smollm2"
    smollm2.load_smollm2(cache)
    (cache / MANIFEST).unlink()
    smollm2.load_smollm2(cache)
    assert len(fake_conversion) == 2


def test_a_damaged_model_folder_that_cannot_be_converted_again_names_the_folder_to_delete(
    tmp_path, fake_conversion, monkeypatch
):
    cache = tmp_path / "smollm2"
    smollm2.load_smollm2(cache)
    (cache / "model.safetensors").write_bytes(b"\0" * 8)

    def no_space(gguf, attn_implementation):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(smollm2, "_convert_smollm2", no_space)
    with pytest.raises(ValueError) as raised:
        smollm2.load_smollm2(cache)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"The converted SmolLM2 folder {cache} is damaged (")
    assert message.endswith(f"delete the folder {cache} and run again.")


def test_a_model_folder_that_does_not_load_names_the_folder_to_delete(tmp_path, fake_conversion):
    cache = tmp_path / "smollm2"
    smollm2.load_smollm2(cache)
    (cache / "model.safetensors").write_bytes(b"\0" * 8)
    write_manifest(cache)  # damaged, yet sealed as if intact: only loading can tell
    with pytest.raises(ValueError, match=f"cannot be loaded .*delete the folder {cache}"):
        smollm2.load_smollm2(cache)
