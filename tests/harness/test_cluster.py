"""Multiruns across processes: kills and resumes, concurrent runs, failed jobs, launchers, and a
real single-node SLURM (started by ``.ci/slurm.sh``; CI must run those tests, never skip them)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capkv.harness.cluster import narrow_local_devices
from capkv.harness.runner import shard_lock_path
from capkv.harness.shards import Shard
from capkv.results.store import finished_rows, run_directory
from capkv.storage.locking import is_held

ROOT = Path(__file__).resolve().parents[2]
# 6 needle prompts x 2 cells, in sweep mode.
SWEEP = [
    "model=tiny-random",
    "task.context_lengths=[200,400]",
    "task.depths=[0,50,100]",
    "methods=[capkv,streamingllm]",
    "budgets=[64]",
]
N_EXAMPLES = 6
TABLES = ("scores.csv", "main_table.csv", "needle.csv")
# Jobs import this checkout's capkv, wherever they run.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SLURM_JOBS = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]


# What a timeout shows: the SLURM daemons' last log lines (a dead or hung controller says why).
SLURM_LOGS = [Path("/var/log/slurm/slurmctld.log"), Path("/var/log/slurm/slurmd.log")]


def service_logs(lines: int = 20) -> str:
    """The last lines of the SLURM daemons' logs (empty where there are none)."""
    parts = []
    for log in SLURM_LOGS:
        if log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- last {len(tail)} lines of {log}:\n" + "\n".join(tail))
    return "\n".join(parts)


def bounded(command: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` that fails the test with the services' logs instead of hanging."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if expired.stderr else ""
        raise AssertionError(
            f"{' '.join(map(str, command))} did not finish within {timeout:.0f}s\n"
            f"{stderr[-2000:]}\n{service_logs()}"
        ) from None


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """``process.communicate`` that kills it and fails the test with the logs after ``timeout``."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(
            f"the run did not finish within {timeout:.0f}s\n{err[-2000:]}\n{service_logs()}"
        ) from None


def command(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), *overrides]


def run(cwd: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """python run.py <overrides> in ``cwd`` (Hydra's outputs land there)."""
    return bounded(command(*overrides), timeout=600, cwd=cwd, env=env or ENV)


def start(cwd: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        command(*overrides),
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def tables(results: Path) -> dict[str, str]:
    return {name: (results / name).read_text() for name in TABLES}


def cell(results: Path, method: str = "capkv") -> Path:
    return run_directory(results, "tiny-random", "needle", method, "budget64", "query_aware")


def wait_until(condition, what: str, timeout: float = 300, process=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{service_logs()}")
        time.sleep(0.05)


def rows_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    """The tables of the sweep run as one process, unsharded."""
    folder = tmp_path_factory.mktemp("reference")
    ok(run(folder, *SWEEP, "results_dir=results"))
    return tables(folder / "results")


def test_a_shard_killed_mid_run_resumes_to_the_uninterrupted_tables(tmp_path, reference):
    shard0 = cell(tmp_path / "results") / Shard(0, 2).rows_file
    process = start(tmp_path, *SWEEP, "shards=2", "shard=0", "results_dir=results")
    try:
        wait_until(lambda: rows_in(shard0) >= 1, "the first row", process=process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert rows_in(shard0) < N_EXAMPLES // 2, "killed too late to test anything"
    # The config was declared before the first row: other settings are refused, even now.
    assert (cell(tmp_path / "results") / "config.yaml").exists()
    other = run(tmp_path, *SWEEP[:2], "task.depths=[0,50]", *SWEEP[3:], "results_dir=results")
    assert other.returncode != 0
    assert "holds results of other settings (differs in task.depths)" in other.stderr
    ok(run(tmp_path, *SWEEP, "shards=2", "shard=1", "results_dir=results"))
    ok(run(tmp_path, *SWEEP, "shards=2", "shard=0", "results_dir=results"))
    assert tables(tmp_path / "results") == reference


def test_two_concurrent_runs_of_one_cell_give_one_refusal_and_no_duplicated_row(
    tmp_path, reference
):
    lock = shard_lock_path(cell(tmp_path / "results"), Shard())
    first = start(tmp_path, *SWEEP, "results_dir=results")
    try:
        wait_until(lambda: is_held(lock), "the first run to claim its cells", process=first)
        # Paused while it holds its claim, so the second run meets it however fast it runs.
        first.send_signal(signal.SIGSTOP)
        second = run(tmp_path, *SWEEP, "results_dir=results")
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = finish(first)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode != 0
    assert error_lines(second.stderr) == [
        f"error: Another process is writing {cell(tmp_path / 'results')}; wait for it to "
        "finish (or stop it) before running it again."
    ]
    for method in ("capkv", "streamingllm"):
        ids = [row["example_id"] for row in finished_rows(cell(tmp_path / "results", method))]
        lines = rows_in(cell(tmp_path / "results", method) / "examples.jsonl")
        assert len(ids) == len(set(ids)) == lines == N_EXAMPLES
    assert tables(tmp_path / "results") == reference


def test_concurrent_runs_of_different_cells_both_appear_in_the_tables(tmp_path):
    overrides = [*SWEEP[:3], "budget=64", "results_dir=results"]
    runs = [start(tmp_path, *overrides, f"method={m}") for m in ("capkv", "streamingllm")]
    for process in runs:
        _, err = finish(process)
        assert process.returncode == 0, err[-3000:]
    written = tables(tmp_path / "results")
    assert {"capkv", "streamingllm"} <= set(written["main_table.csv"].split(","))
    rebuilt = ok(
        bounded(
            [sys.executable, "-m", "capkv.results", "results"], timeout=600, cwd=tmp_path, env=ENV
        )
    )
    assert "wrote" in rebuilt.stdout
    assert tables(tmp_path / "results") == written  # a function of the run folders alone


def check_failed_job_report(result: subprocess.CompletedProcess) -> None:
    """Job #2 (shard=2 of 2) failed alone, in one line, and the multirun says so."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = "error: shard=2 is not one of the 2 shards [0, 2); pass 0 to 1."
    assert "multirun: 1 of 3 jobs failed:" in result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("  #")]
    assert len(summary) == 1
    assert summary[0].startswith("  #2 (") and summary[0].endswith(message)


def test_a_failing_job_of_a_multirun_fails_alone_in_one_line(tmp_path, reference):
    result = run(tmp_path, "-m", *SWEEP, "shards=2", "shard=0,1,2", "results_dir=results")
    check_failed_job_report(result)
    assert "job #2: error: shard=2 is not one of the 2 shards" in result.stderr
    assert tables(tmp_path / "results") == reference  # jobs 0 and 1 finished, tables rebuilt


def test_two_local_workers_give_the_tables_of_one_process(tmp_path, reference):
    ok(
        run(
            tmp_path,
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.cpus_per_task=1",
            *SWEEP,
            "shards=2",
            "shard=0,1",
            "results_dir=results",
        )
    )
    assert tables(tmp_path / "results") == reference
    assert len(list((tmp_path / "multirun").glob("*/*/*/job.json"))) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["shards=2", "shard=2"], "error: shard=2 is not one of the 2 shards [0, 2); pass 0 to 1."),
        (["shards=0"], "error: shards=0 must be a whole number of shards, 1 or more."),
        (["-m", "hydra/launcher=pbs"], "error: unknown launcher 'pbs'; choose one of: basic,"),
        (
            ["-m", "hydra/launcher=slurm"],
            "error: launcher 'slurm' submits with sbatch, which is not",
        ),
    ],
)
def test_bad_cluster_input_gives_one_error_line_and_writes_nothing(tmp_path, overrides, message):
    env = {**ENV, "PATH": str(tmp_path / "empty")}  # no sbatch here
    result = run(tmp_path, "model=tiny-random", *overrides, "results_dir=results", env=env)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def holder_of(lock: Path) -> int | None:
    """The process holding ``lock`` open (a job of the local launcher), read from /proc."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue
        if str(lock) in links:
            return int(fd_dir.parent.name)
    return None


def test_a_job_killed_outright_is_reported_in_one_line_and_resubmitting_resumes(tmp_path):
    """SIGKILL (what the out-of-memory killer sends) to one local job: the other finishes, the
    multirun ends with the summary and exit status 1, and the same command again completes."""
    sweep = [*SWEEP, "task.max_new_tokens=96"]  # long answers: the kill lands mid-shard
    overrides = ["-m", "hydra/launcher=local", "hydra.launcher.cpus_per_task=1", *sweep]
    overrides += ["shards=2", "shard=0,1", "results_dir=results"]
    shard0 = cell(tmp_path / "results") / Shard(0, 2).rows_file
    lock = shard_lock_path(cell(tmp_path / "results"), Shard(0, 2))
    multirun = start(tmp_path, *overrides)
    try:
        wait_until(lambda: rows_in(shard0) >= 1, "shard 0's first row", process=multirun)
        job = holder_of(lock)
        assert job is not None and job != multirun.pid
        os.kill(job, signal.SIGKILL)
        _, err = finish(multirun)
    finally:
        if multirun.poll() is None:
            multirun.kill()
    assert rows_in(shard0) < N_EXAMPLES // 2, "killed too late to test anything"
    assert multirun.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lost = "error: the job ended without a result (state "
    assert f"job #0: {lost}" in err
    assert "multirun: 1 of 2 jobs failed:" in err
    summary = [line for line in err.splitlines() if line.startswith("  #")]
    assert len(summary) == 1 and summary[0].startswith("  #0 (")
    assert "killed outright (SIGKILL, as the out-of-memory killer does)" in summary[0]
    shard1 = cell(tmp_path / "results") / Shard(1, 2).rows_file
    assert rows_in(shard1) == N_EXAMPLES // 2  # the other job finished
    ok(run(tmp_path, *overrides))
    for method in ("capkv", "streamingllm"):
        folder = cell(tmp_path / "results", method)
        ids = [row["example_id"] for row in finished_rows(folder)]
        lines = sum(rows_in(path) for path in folder.glob("examples*.jsonl"))
        assert len(ids) == len(set(ids)) == lines == N_EXAMPLES


def test_a_cell_being_written_under_one_shard_count_refuses_another(tmp_path):
    """Each process skips what was done when it started, so two shard counts at once could run
    one example twice: the second count is refused; one after the other, nothing runs twice."""
    results = tmp_path / "results"
    lock = shard_lock_path(cell(results), Shard(0, 2))
    first = start(tmp_path, *SWEEP, "shards=2", "shard=0", "results_dir=results")
    try:
        wait_until(lambda: is_held(lock), "shard 0 of 2 to claim its cells", process=first)
        first.send_signal(signal.SIGSTOP)
        second = run(tmp_path, *SWEEP, "results_dir=results")
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = finish(first)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1
    assert error_lines(second.stderr) == [
        f"error: Another process is writing {cell(results)} as shards=2, which would run "
        "examples of shards=1 twice; run it with shards=2 too, or wait for that run to finish."
    ]
    ok(run(tmp_path, *SWEEP, "shards=3", "shard=1", "results_dir=results"))
    ok(run(tmp_path, *SWEEP, "results_dir=results"))  # resumed under a third count
    for method in ("capkv", "streamingllm"):
        folder = cell(results, method)
        lines = sum(rows_in(path) for path in folder.glob("examples*.jsonl"))
        assert lines == len(finished_rows(folder)) == N_EXAMPLES  # no example ran twice


# --------------------------------------------------------------------------- a real SLURM


def slurm_answers() -> bool:
    if shutil.which("sbatch") is None:
        return False
    state = bounded(["sinfo", "-h", "-o", "%T"])
    return state.returncode == 0 and any(
        s.startswith(("idle", "mixed", "allocated")) for s in state.stdout.split()
    )


@pytest.fixture(scope="module")
def slurm():
    """A single-node SLURM with accounting: the running one, or one started here as root."""
    started = False
    if not slurm_answers():
        if os.geteuid() != 0:
            reason = "SLURM is not running and starting it needs root: sudo .ci/slurm.sh start"
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI must run the SLURM tests: {reason}")
            pytest.skip(reason)
        started_now = bounded([str(ROOT / ".ci" / "slurm.sh"), "start"], timeout=1800)
        assert started_now.returncode == 0, started_now.stderr[-3000:]
        started = True
    yield
    if started:
        bounded([str(ROOT / ".ci" / "slurm.sh"), "stop"], timeout=120)


def slurm_queue_empty() -> bool:
    queue = bounded(["squeue", "-h", "-o", "%i"])
    return queue.returncode == 0 and not queue.stdout.strip()


def test_a_sharded_sweep_on_slurm_merges_to_the_single_process_tables(slurm, tmp_path, reference):
    """Array tasks 0 and 1 are the two shards; task 2 (shard=2 of 2) is bad input: it fails
    alone, in one line, while the others finish and the tables are rebuilt."""
    result = run(
        tmp_path, "-m", *SLURM_JOBS, *SWEEP, "shards=2", "shard=0,1,2", "results_dir=results"
    )
    check_failed_job_report(result)
    assert tables(tmp_path / "results") == reference
    folders = [p.name for p in (tmp_path / "multirun").glob("*/*/.submitit/*_*")]
    tasks = [name.split("_") for name in folders if re.fullmatch(r"\d+_\d+", name)]
    assert sorted(index for _, index in tasks) == ["0", "1", "2"]
    assert len({array for array, _ in tasks}) == 1  # one job array


def test_a_cancelled_slurm_shard_resubmitted_completes_the_tables(slurm, tmp_path):
    # Longer answers (the tiny random model rarely stops early): scancel lands mid-shard.
    sweep = [*SWEEP, "task.max_new_tokens=96"]
    ok(run(tmp_path, *sweep, "results_dir=reference"))
    overrides = ["-m", *SLURM_JOBS, *sweep, "shards=2", "shard=0,1", "results_dir=results"]
    shard0 = cell(tmp_path / "results") / Shard(0, 2).rows_file
    multirun = start(tmp_path, *overrides)
    try:
        wait_until(lambda: rows_in(shard0) >= 1, "shard 0's first row", process=multirun)
        queue = bounded(["squeue", "-h", "-o", "%i"])
        (task,) = [job for job in queue.stdout.split() if job.endswith("_0")]
        assert bounded(["scancel", task]).returncode == 0
        _, err = finish(multirun)
    finally:
        if multirun.poll() is None:
            multirun.kill()
    assert rows_in(shard0) < N_EXAMPLES // 2, "cancelled too late to test anything"
    assert multirun.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "error: stopped by SIGTERM (scancel, preemption or the time limit)" in err
    wait_until(slurm_queue_empty, "shard 1 to finish")
    ok(run(tmp_path, *overrides))
    assert tables(tmp_path / "results") == tables(tmp_path / "reference")


def test_a_slurm_shard_killed_outright_is_one_line_and_resubmitting_resumes(slurm, tmp_path):
    """SIGKILL to array task 0 (as the out-of-memory killer does): no result comes back from
    it, the multirun reports it in one line and exits 1 after task 1 finished; resubmitting
    completes the cell with no example run twice."""
    sweep = [*SWEEP, "task.max_new_tokens=96"]
    overrides = ["-m", *SLURM_JOBS, *sweep, "shards=2", "shard=0,1", "results_dir=results"]
    shard0 = cell(tmp_path / "results") / Shard(0, 2).rows_file
    multirun = start(tmp_path, *overrides)
    try:
        wait_until(lambda: rows_in(shard0) >= 1, "shard 0's first row", process=multirun)
        # The node is this machine: the job's process is killed as the OOM killer kills it.
        job = holder_of(shard_lock_path(cell(tmp_path / "results"), Shard(0, 2)))
        assert job is not None
        os.kill(job, signal.SIGKILL)
        _, err = finish(multirun)
    finally:
        if multirun.poll() is None:
            multirun.kill()
    assert rows_in(shard0) < N_EXAMPLES // 2, "killed too late to test anything"
    assert multirun.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "job #0: error: the job ended without a result (state " in err
    assert "multirun: 1 of 2 jobs failed:" in err
    wait_until(slurm_queue_empty, "the queue to empty", timeout=120)
    ok(run(tmp_path, *overrides))
    for method in ("capkv", "streamingllm"):
        folder = cell(tmp_path / "results", method)
        lines = sum(rows_in(path) for path in folder.glob("examples*.jsonl"))
        assert lines == len(finished_rows(folder)) == N_EXAMPLES


def test_slurm_start_with_a_hung_controller_fails_with_its_log_lines(slurm):
    """A controller that no longer answers (stopped, as a hung one is) fails .ci/slurm.sh within
    its bounded wait, with the daemons' last log lines, instead of hanging CI."""
    pid = int(Path("/run/slurmctld.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = bounded([str(ROOT / ".ci" / "slurm.sh"), "start"], timeout=300)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert result.returncode == 1
    assert f"the node {os.uname().nodename.split('.')[0]} did not come up within 60s" in (
        result.stderr
    )
    assert "last 20 lines of /var/log/slurm/slurmctld.log:" in result.stderr
    assert took < 200
    wait_until(slurm_answers, "the controller to answer again", timeout=120)


# --------------------------------------------------------------------------- per-job resources


def test_a_local_job_keeps_one_of_the_gpus_it_sees(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for job_num, expected in [(0, "0"), (1, "1"), (2, "2"), (3, "0")]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
        narrow_local_devices(job_num)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == expected
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # SLURM already gave the job its GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    narrow_local_devices(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"


@pytest.mark.slow
def test_jobs_starting_together_convert_smollm2_once(tmp_path):
    code = (
        "import sys; import capkv.models.smollm2 as m; convert = m._convert_smollm2\n"
        "def counted(*args):\n"
        "    print('converted', flush=True)\n"
        "    return convert(*args)\n"
        "m._convert_smollm2 = counted\n"
        "model, _ = m.load_smollm2(sys.argv[1])\n"
        "print(model.config.num_hidden_layers, flush=True)\n"
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    jobs = []
    for i in range(2):
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            jobs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code, str(tmp_path / "cache" / "smollm2")],
                    env=ENV,
                    stdout=out,
                    stderr=err,
                )
            )
    for i, job in enumerate(jobs):
        assert job.wait(timeout=600) == 0, (logs / f"{i}.err").read_text()[-3000:]
    lines = [(logs / f"{i}.out").read_text().split() for i in range(2)]
    assert sorted(lines) == [["30"], ["converted", "30"]]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2"]
