"""Hostile input: every bad input refused in one line before any work, damaged state named,
interrupts reported in one line, nothing silently substituted or dropped."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capkv.figures.cli import main as figures_main
from capkv.harness.runner import Cell, run_cell
from capkv.models import build_tiny_model
from capkv.results.store import (
    CONFIG,
    EXAMPLES,
    METRICS,
    finished_rows,
    run_directory,
    run_identity,
)
from capkv.results.tables import aggregate
from capkv.storage.files import write_atomically
from capkv.tasks.base import capped
from capkv.tasks.needle import NeedleTask
from capkv.tasks.ruler import RulerSuite

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny-random", "task.context_lengths=[200,400]", "task.depths=[0,100]"]
NEEDLE_CELL = ("tiny-random", "needle", "capkv", "budget64", "query_aware")
GOOD_RECORD = {"input": "Who?", "context": "Ann wrote it.", "answers": ["Ann"]}

# (name, overrides, what the one error line must say). A ``{tmp}`` in an override is the case's
# own folder; files named ``*.jsonl`` there are written from BAD_FILES first.
BAD_INPUTS = [
    ("budget not a number", ["budget=abc"], "budget='abc' is not a number"),
    ("fractional budget", ["budget=1.5"], "budget=1.5 is a fraction"),
    ("ratio not a number", ["ratio=abc"], "ratio='abc' is not a number"),
    ("empty budgets", ["budgets=[]"], "budgets=[] is empty"),
    ("empty ratios", ["ratios=[]"], "ratios=[] is empty"),
    ("empty methods", ["methods=[]"], "methods=[] is empty"),
    ("methods not a list", ["methods=capkv"], "is not a list"),
    ("budgets holding text", ["budgets=[64,abc]"], "holds 'abc'"),
    ("empty context lengths", ["task.context_lengths=[]"], "task.context_lengths=[] is empty"),
    ("empty depths", ["task.depths=[]"], "task.depths=[] is empty"),
    ("max_examples zero", ["max_examples=0"], "max_examples=0 is not positive"),
    ("max_examples fraction", ["max_examples=2.5"], "max_examples=2.5 is not a whole number"),
    ("diagnostics not boolean", ["diagnostics=maybe"], "diagnostics='maybe'"),
    ("decode_batch not boolean", ["decode_batch=1"], "decode_batch=1 is not true, false"),
    (
        "batched decoding of one cell",
        ["method=capkv", "budget=64", "decode_batch=true"],
        "decode_batch=true has no cells to decode together: it is one cell",
    ),
    (
        "batched decoding of streaming cells",
        ["methods=[capkv,snapkv]", "budgets=[64]", "chunk=128", "decode_batch=true"],
        "decode_batch=true has no cells to decode together: its cells stream",
    ),
    (
        "batched decoding of a reading task",
        ["task=perplexity", "methods=[capkv]", "budgets=[64]", "decode_batch=true"],
        "decode_batch=true has no cells to decode together: task=perplexity reads its texts",
    ),
    ("variant with a slash", ["variant=a/b"], "variant='a/b'"),
    ("misspelt key", ["buget=5"], "unknown config key 'buget'; did you mean budget?"),
    ("hyperparameter not a number", ["method.tau=abc"], "method.tau='abc' is not a number"),
    ("unknown hyperparameter", ["+method.foo=3"], "method.foo is not a setting of CapKV"),
    ("unreadable override", ["budget=[1,"], "could not read the command line"),
    ("device missing here", ["model.device=cuda:99"], "model.device=cuda:99"),
    ("device unknown", ["model.device=banana"], "model.device='banana' is not a device"),
    ("custom without a path", ["task=custom"], "task.path has no value"),
    ("results_dir a file", ["results_dir={tmp}/file"], "is a file, not a folder"),
    ("results_dir under a file", ["results_dir={tmp}/file/results"], "which is a file"),
    ("results_dir unwritable", ["results_dir={unwritable}/results"], "cannot be written"),
    (
        "JSONL line not an object",
        ["task=custom", "task.path={tmp}/list.jsonl"],
        "line 2 of {tmp}/list.jsonl holds a JSON list, not an object",
    ),
    (
        "JSONL line not JSON",
        ["task=custom", "task.path={tmp}/broken.jsonl"],
        "line 2 of {tmp}/broken.jsonl is not valid JSON",
    ),
    (
        "JSONL record lacking a field",
        ["task=custom", "task.path={tmp}/lacking.jsonl"],
        "line 2 of {tmp}/lacking.jsonl lacks the field 'context'",
    ),
    (
        "JSONL null answers",
        ["task=custom", "task.path={tmp}/null.jsonl"],
        "line 2 of {tmp}/null.jsonl: field 'answers' holds null",
    ),
    (
        "JSONL answers a string",
        ["task=custom", "task.path={tmp}/string.jsonl"],
        "line 2 of {tmp}/string.jsonl: field 'answers' holds \"Ann\"",
    ),
    (
        "generation bound on a reading task",
        ["task=perplexity", "compress_every=64"],
        "compress_every=64 bounds generation, and task=perplexity generates nothing",
    ),
    (
        "perplexity bucket zero",
        ["task=perplexity", "task.bucket=0"],
        "task.bucket=0 is not a number of token positions",
    ),
    (
        "perplexity text longer than the model",
        ["task=perplexity", "task.length=5000"],
        "task.length=5000 is longer than the model's 4096 positions",
    ),
    (
        "long generation of no tokens",
        ["task=long_generation", "task.new_tokens=0"],
        "task.new_tokens=0 is not a positive whole number",
    ),
    (
        "long generation beyond the essays",
        ["task=long_generation", "task.prompts=60"],
        "essays hold at least 1536 tokens, so task.prompts=60 prompts cannot be made",
    ),
    ("damaged config.yaml", ["method=capkv", "budget=64"], "config.yaml is not a valid config"),
    (
        "context too short for the needle",
        ["task.context_lengths=[10]"],
        "context length 10 cannot hold the needle task's fixed parts: its intro and needle take ",
    ),
    (
        "context too short for RULER",
        ["task=ruler", "task.subtasks=[niah_single]", "task.context_lengths=[150]"],
        "context length 150 cannot hold RULER niah_single's fixed parts",
    ),
    (
        "model folder missing",
        ["model.name={tmp}/no-such-model"],
        "Model folder '{tmp}/no-such-model' does not exist",
    ),
    (
        "model folder without a checkpoint",
        ["model.name={tmp}"],
        "Folder '{tmp}' holds no transformers checkpoint (config.json)",
    ),
    (
        "hub id unknown, offline",
        ["model.name=capkv-nobody/no-such-model"],
        "Model 'capkv-nobody/no-such-model' could not be found locally or on the Hugging Face hub",
    ),
    ("floor above 1", ["method=snapkv", "method.floor=1.5"], "floor=1.5 is outside [0, 1]"),
    ("floor below 0", ["method=capkv_adaptive", "method.floor=-0.1"], "floor=-0.1 is outside"),
    ("unknown allocation", ["method.allocation=greedy"], "allocation='greedy' is not an"),
    (
        "allocation without scores",
        ["method=streamingllm", "method.allocation=adaptive"],
        "StreamingLLM has no scores to rank across heads",
    ),
    (
        "model-wide allocation of attention scores",
        ["methods=[snapkv]", "method=snapkv", "method.allocation=model", "budgets=[64]"],
        "SnapKV scores are not comparable across layers",
    ),
    ("chunk zero", ["chunk=0"], "chunk=0 is not positive"),
    ("chunk not a number", ["chunk=abc"], "chunk='abc' is not a whole number"),
    ("compress_every fraction", ["compress_every=1.5"], "compress_every=1.5 is not a whole"),
    (
        "diagnostics while streaming",
        ["methods=[capkv]", "chunk=128", "diagnostics=true"],
        "diagnostics=true measures one compression of the whole prompt",
    ),
    (
        "head-adaptive allocation while streaming",
        ["method=snapkv_adaptive", "chunk=128"],
        "allocation=adaptive does not stream",
    ),
    (
        "no per-head mask",
        ["methods=[capkv,capkv_model]", "model.attn_implementation=flash_attention_2"],
        "attn_implementation=flash_attention_2 cannot mask each KV head's own kept tokens",
    ),
    (
        "shared context on a task of one question per context",
        ["protocol=shared_context"],
        "task=needle asks one per context; use a task with several: task=needle with "
        "task.num_needles>1",
    ),
    (
        "accumulate not boolean",
        ["protocol=shared_context", "task.num_needles=2", "accumulate=maybe"],
        "accumulate='maybe' is not true or false",
    ),
    (
        "accumulate with one question per prompt",
        ["accumulate=true"],
        "accumulate=true keeps each question and answer of a shared context",
    ),
    (
        "a shared context compressed while answering",
        ["protocol=shared_context", "task.num_needles=2", "compress_every=16"],
        "compress_every=16 compresses while answering, and protocol=shared_context crops",
    ),
    (
        "accumulating turns in a streamed cache",
        ["protocol=shared_context", "task.num_needles=2", "accumulate=true", "chunk=128"],
        "accumulate=true with chunk=128 would let every turn grow the cache past budget + chunk",
    ),
    (
        "accumulating turns decoded together",
        [
            "protocol=shared_context",
            "task.num_needles=2",
            "accumulate=true",
            "methods=[capkv,snapkv]",
            "decode_batch=true",
        ],
        "decode_batch=true cannot decode accumulating turns together",
    ),
    ("no needles", ["task.num_needles=0"], "num_needles"),
    (
        "more needles than the context holds",
        ["protocol=shared_context", "task.num_needles=40"],
        "fewer task.num_needles",
    ),
    (
        "several questions of a RULER task that asks one",
        ["task=ruler", "task.subtasks=[vt]", "task.num_questions=2"],
        "niah_multikey",
    ),
    ("unknown cache backend", ["cache.quantization=int3"], "cache.quantization='int3' is not"),
    (
        "bits the backend lacks",
        ["cache.quantization=quanto", "cache.nbits=3"],
        "cache.nbits=3 is not offered by cache.quantization=quanto",
    ),
    (
        "axis the backend lacks",
        ["cache.quantization=hqq", "cache.axis_key=-1"],
        "cache.axis_key=-1 is not an axis of cache.quantization=hqq",
    ),
    ("group size not a number", ["cache.q_group_size=abc"], "cache.q_group_size='abc' is not"),
    (
        "group size zero",
        ["cache.quantization=fp8", "cache.q_group_size=0"],
        "cache.q_group_size=0 is not positive",
    ),
    ("unknown cache key", ["+cache.bits=4"], "cache.bits is not a setting of CacheQuantization"),
    (
        "quantized cache while streaming",
        ["cache.quantization=fp8", "chunk=128"],
        "cache.quantization=fp8 stores a cache compressed once",
    ),
    (
        "quantized cache of a shared context",
        ["protocol=shared_context", "task.num_needles=2", "cache.quantization=fp8"],
        "cannot crop each question off a quantized cache",
    ),
    (
        "quantized caches decoded together",
        ["methods=[capkv,snapkv]", "cache.quantization=fp8", "decode_batch=true"],
        "pads full-precision caches into one batch",
    ),
    (
        "quantized cache of a reading task",
        ["task=perplexity", "cache.quantization=fp8"],
        "task=perplexity decodes none of its own",
    ),
    (
        "bytes together with tokens",
        ["method=snapkv", "kv_bytes=8192", "budget=64"],
        "Both budget=64 and kv_bytes=8192 were given",
    ),
    (
        "bytes together with a ratio",
        ["method=snapkv", "kv_fraction=0.25", "ratio=0.5"],
        "Both ratio=0.5 and kv_fraction=0.25 were given",
    ),
    (
        "a byte budget below one token",
        ["method=snapkv", "cache.quantization=fp8", "kv_bytes=20"],
        "kv_bytes=20 holds no token per KV head in cache.quantization=fp8 at 8 bits (one token "
        "takes 40 bytes per KV head and layer); pass kv_bytes=40 or more.",
    ),
    ("a byte fraction above one", ["kv_fraction=1.5"], "not a share of the full cache's bytes"),
    (
        "a byte fraction of zero in a sweep",
        ["methods=[snapkv]", "kv_fractions=[0.5,0]"],
        "kv_fractions=[0.5,0] holds 0, not a share",
    ),
    (
        "one byte budget in a sweep",
        ["methods=[snapkv]", "kv_bytes=8192"],
        "A sweep takes its budgets from budgets=[...], ratios=[...], kv_byte_budgets=[...]",
    ),
    ("an unknown storage", ["methods=[snapkv]", "caches=[int3]"], "caches=[...] holds 'int3'"),
    (
        "bits a storage lacks",
        ["methods=[snapkv]", "caches=[bf16,quanto8]"],
        "cache.nbits=8 is not offered by cache.quantization=quanto",
    ),
    (
        "a byte budget below a method's window",
        ["method=snapkv", "method.window=32", "kv_bytes=1024"],
        "kvbytes1024 holds 8 tokens per KV head in the model's precision: SnapKV always keeps",
    ),
]
BAD_FILES = {
    "list.jsonl": [GOOD_RECORD, ["not", "an", "object"]],
    "broken.jsonl": [GOOD_RECORD, '{"input": "Who?", "context": '],
    "lacking.jsonl": [GOOD_RECORD, {"input": "Who?", "answers": ["Ann"]}],
    "null.jsonl": [GOOD_RECORD, {**GOOD_RECORD, "answers": None}],
    "string.jsonl": [GOOD_RECORD, {**GOOD_RECORD, "answers": "Ann"}],
}

# Runs run.py's __main__ block once per case inside one interpreter (the imports take seconds);
# prints one JSON line per case: its exit status and everything it wrote to stderr.
DRIVER = """
import contextlib, io, json, runpy, sys
root, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
for overrides in cases:
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


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root writes anywhere but into /proc)."""
    if os.geteuid() == 0:
        return Path("/proc")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def prepare_case(folder: Path, overrides: list[str], unwritable: Path) -> list[str]:
    folder.mkdir()
    (folder / "file").write_text("not a folder\n")
    for name, lines in BAD_FILES.items():
        text = "".join(
            (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
        )
        (folder / name).write_text(text)
    filled = [o.format(tmp=folder, unwritable=unwritable) for o in overrides]
    if not any(o.startswith("results_dir=") for o in filled):
        filled.append(f"results_dir={folder / 'results'}")
    other_task = any(o.startswith("task=") for o in overrides)  # TINY sets needle settings
    return [*(TINY if not other_task else TINY[:1]), *filled]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """Every BAD_INPUTS case run through run.py: name -> (status and stderr, case folder)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    unwritable = unwritable_folder(tmp)
    folders = {name: tmp / f"case{i}" for i, (name, _, _) in enumerate(BAD_INPUTS)}
    argvs = [
        prepare_case(folders[name], overrides, unwritable) for name, overrides, _ in BAD_INPUTS
    ]
    damaged = run_directory(folders["damaged config.yaml"] / "results", *NEEDLE_CELL)
    damaged.mkdir(parents=True)
    (damaged / CONFIG).write_text("model: [unclosed\n")
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ROOT), json.dumps(argvs)],
        cwd=tmp,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},  # the hub offline: its lookups fail at once
        capture_output=True,
        text=True,
        timeout=900,
    )
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(outcomes) == len(BAD_INPUTS), result.stderr[-3000:]
    return {name: (outcomes[i], folders[name]) for i, (name, _, _) in enumerate(BAD_INPUTS)}


@pytest.mark.parametrize(("name", "message"), [(n, m) for n, _, m in BAD_INPUTS])
def test_each_bad_input_is_refused_in_one_line_before_any_work(refusals, name, message):
    outcome, folder = refusals[name]
    lines = outcome["stderr"].strip().splitlines()
    assert outcome["status"] == 1
    assert len(lines) == 1, outcome["stderr"]
    assert lines[0].startswith("error: ")
    assert message.format(tmp=folder) in lines[0]
    assert "Traceback" not in outcome["stderr"]
    if name == "damaged config.yaml":  # the folder was there before: no row added
        cell = run_directory(folder / "results", *NEEDLE_CELL)
        assert sorted(p.name for p in cell.iterdir()) == [CONFIG]
    else:
        assert not (folder / "results").exists()


def run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "run.py"), *overrides, "results_dir=results"]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_a_hydra_error_is_one_line_from_a_fresh_process(tmp_path):
    result = run(tmp_path, "model=tiny-random", "method=snapkv", "method.window=abc")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: method.window='abc' is not a whole number; pass a whole number, e.g. "
        "method.window=32."
    ]
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- state files


def test_resume_keeps_every_valid_row_around_a_damaged_line(tmp_path, caplog):
    rows = [{"example_id": f"ex{i}", "scores": {"exact": 1.0}} for i in range(4)]
    lines = [json.dumps(row) for row in rows]
    lines.insert(2, '{"example_id": "ex9", "scor')  # damaged, mid-file
    lines.insert(4, "[1, 2]")  # JSON, but not a row
    (tmp_path / EXAMPLES).write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        assert finished_rows(tmp_path) == rows
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert f"{tmp_path / EXAMPLES}, line 3," in warnings[0]
    assert f"{tmp_path / EXAMPLES}, line 5," in warnings[1]


def test_a_run_recomputes_only_the_damaged_line(tmp_path, monkeypatch):
    from baselines import SnapKV
    from capkv import Budget
    from capkv.harness import runner

    model, tokenizer = build_tiny_model()
    task = NeedleTask(context_lengths=[200], depths=[0, 50, 100])
    identity = run_identity("tiny-random", "needle", "capkv", "", Budget(tokens=64), "query_aware")
    args = (model, tokenizer, task)
    run_cell(*args, Cell(SnapKV(window=8), Budget(tokens=64), tmp_path, identity), "query_aware")
    reference = finished_rows(tmp_path)
    lines = (tmp_path / EXAMPLES).read_text().splitlines()
    lines[1] = lines[1][:30]  # the middle row is damaged
    (tmp_path / EXAMPLES).write_text("\n".join(lines) + "\n")
    calls = []
    original = runner.generate_one
    monkeypatch.setattr(runner, "generate_one", lambda *a: calls.append(1) or original(*a))
    run_cell(*args, Cell(SnapKV(window=8), Budget(tokens=64), tmp_path, identity), "query_aware")
    assert len(calls) == 1
    resumed = finished_rows(tmp_path)
    assert [r["example_id"] for r in resumed] == [reference[i]["example_id"] for i in (0, 2, 1)]
    assert resumed[:2] == [reference[0], reference[2]]
    assert len((tmp_path / EXAMPLES).read_text().splitlines()) == 3


def write_metrics_file(results_dir: Path, method: str, text: str) -> Path:
    cell = run_directory(results_dir, "tiny-random", "needle", method, "budget64", "query_aware")
    cell.mkdir(parents=True)
    (cell / METRICS).write_text(text)
    return cell / METRICS


@pytest.mark.parametrize("damage", ["", "{not json", '{"model": "tiny-random"}', "[]"])
def test_aggregation_skips_a_damaged_cell_with_one_warning(tmp_path, caplog, damage):
    good = {
        "model": "tiny-random",
        "task": "needle",
        "method": "capkv",
        "variant": "",
        "budget": "budget64",
        "budget_tokens": 64,
        "ratio": None,
        "protocol": "query_aware",
        "n_examples": 1,
        "scores": {"exact": 100.0},
        "subtasks": {},
        "mean_prompt_tokens": 100.0,
        "mean_kept_tokens": 64.0,
    }
    write_metrics_file(tmp_path, "capkv", json.dumps(good))
    bad = write_metrics_file(tmp_path, "snapkv", damage)
    with caplog.at_level(logging.WARNING):
        frames = aggregate(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "Rerun that cell" in warnings[0]
    assert set(frames["scores"]["method"]) == {"capkv"}
    assert (tmp_path / "main_table.md").read_text().count("capkv") == 1


def test_figures_over_a_damaged_table_say_which_file(tmp_path, capsys):
    (tmp_path / "scores.csv").write_text('model,task\n"unclosed,x\n')
    with pytest.raises(SystemExit) as stop:
        figures_main(["--results", str(tmp_path), "--plots", str(tmp_path / "plots")])
    assert stop.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'scores.csv'} ") and "delete it" in line


def test_a_damaged_cell_does_not_fail_another_run_and_max_examples_caps(tmp_path):
    bad = write_metrics_file(tmp_path / "results", "snapkv", "{not json")
    result = run(tmp_path, *TINY, "method=capkv", "budget=64", "max_examples=1")
    assert result.returncode == 0, result.stderr[-3000:]
    output = (result.stdout + result.stderr).splitlines()
    warnings = [line for line in output if "WARNING" in line]
    assert len(warnings) == 1 and str(bad) in warnings[0], output
    assert len(finished_rows(run_directory(tmp_path / "results", *NEEDLE_CELL))) == 1
    assert "capkv" in (tmp_path / "results" / "main_table.md").read_text()


# ----------------------------------------------------------------------------- caps


def test_max_examples_caps_every_subtask(essay_tokenizer):
    needle = NeedleTask(context_lengths=[200, 400], depths=[0, 50, 100])
    assert len(list(capped(needle, 2).examples(essay_tokenizer, 10_000))) == 2
    assert len(list(capped(needle, None).examples(essay_tokenizer, 10_000))) == 6
    ruler = RulerSuite(subtasks=["niah_single", "vt"], context_lengths=[1024], num_examples=3)
    examples = list(capped(ruler, 2).examples(essay_tokenizer, 10_000))
    assert [e.metadata["subtask"] for e in examples] == ["niah_single"] * 2 + ["vt"] * 2


# ----------------------------------------------------------------------------- files and signals


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "table.csv", "a,b\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "table.csv").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


@pytest.mark.parametrize(
    ("signum", "status", "said"),
    [(signal.SIGINT, 130, "interrupted by Ctrl-C"), (signal.SIGTERM, 143, "stopped by SIGTERM")],
)
def test_an_interrupt_says_what_was_saved_in_one_line_and_resumes(tmp_path, signum, status, said):
    overrides = [
        "model=tiny-random",
        "task.context_lengths=[300,400,500,600]",
        "task.depths=[0,10,20,30,40,50,60,70,80,90,100]",
        "method=capkv",
        "budget=64",
    ]
    command = [sys.executable, str(ROOT / "run.py"), *overrides, "results_dir=results"]
    cell = run_directory(tmp_path / "results", *NEEDLE_CELL)
    # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored (no
    # KeyboardInterrupt): the run gets the default disposition back, as a terminal would give it.
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while len(finished_rows(cell)) < 1 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(said) and "run the same command again to resume" in last
    kept = finished_rows(cell)
    assert 1 <= len(kept) < 44
    assert json.loads((cell / METRICS).read_text())["n_examples"] == len(kept)

    resumed = run(tmp_path, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = finished_rows(cell)
    assert len(rows) == 44 and rows[: len(kept)] == kept
