"""Run one (model, task, method, budget, protocol) cell: prefill, evict, decode, score, log."""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from tqdm import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel

from capkv.engine.budget import Budget
from capkv.engine.compression import CompressionRecord, evict, gathered_cache
from capkv.engine.decoding import (
    batched_greedy_generate,
    greedy_generate,
    lockstep_greedy_generate,
)
from capkv.engine.hooks import run_with_cache
from capkv.engine.kv_bytes import REFERENCE_BITS, held_bytes, per_head_layer
from capkv.engine.method import EvictionMethod
from capkv.engine.quantization import CacheQuantization, quantized_cache
from capkv.engine.streaming import StreamSettings, streamed
from capkv.harness.shards import UNSHARDED, Shard, select_shard
from capkv.results.metrics import write_metrics
from capkv.results.store import CONFIG, ExampleLog, finished_rows, read_rows, stored_config
from capkv.storage.files import signals_deferred, write_atomically
from capkv.storage.locking import FileLock, LockHeld, is_held, locked
from capkv.tasks.base import Example, Reporting, Task, extent_settings, task_reporting
from capkv.tasks.common import prompt_limit
from capkv.tasks.prompting import PromptIds, prompt_overhead, tokenize_prompt

log = logging.getLogger(__name__)

SHARED_PROTOCOLS = ("shared_context", "shared_first_question")  # capkv.harness.shared_context
PROTOCOLS = ("query_aware", "context_only", *SHARED_PROTOCOLS)
MAX_NEW_TOKENS_CAP = 512  # room left for the answer when a task truncates its prompts


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}.")


def stop_token_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def prefill_ids(prompt: PromptIds, protocol: str) -> torch.Tensor:
    """What the prefill sees (and compresses): the whole prompt, or only its context."""
    return prompt.full() if protocol == "query_aware" else prompt.context_ids


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Run the prefill into ``cache``; return the logits of its last position."""
    outputs = run_with_cache(model, input_ids.to(model.device), cache, logits_to_keep=1)
    return outputs.logits[0, -1]


def decode(
    model: PreTrainedModel,
    tokenizer: Any,
    caches: list[Cache],
    prompt: PromptIds,
    protocol: str,
    last_logits: torch.Tensor,
    max_new_tokens: int,
    batched: bool = False,
) -> list[str]:
    """Greedy answers from prefilled (compressed) caches of one prompt, under ``protocol``: each
    exactly as alone (several in lockstep, :func:`capkv.engine.decoding.lockstep_greedy_generate`),
    or with ``batched`` as one padded batch (sweep mode's ``decode_batch``)."""
    start, fed = decoding_start(prompt, protocol, last_logits)
    stops = stop_token_ids(model, tokenizer)
    if len(caches) == 1:
        generated = [greedy_generate(model, caches[0], start, max_new_tokens, stops, **fed)]
    elif batched:
        generated = batched_greedy_generate(model, caches, start, max_new_tokens, stops, **fed)
    else:
        generated = lockstep_greedy_generate(model, caches, start, max_new_tokens, stops, **fed)
    return [answer_text(tokenizer, tokens) for tokens in generated]


def answer_text(tokenizer: Any, tokens: list[int]) -> str:
    """The text of a generated answer, special tokens dropped, stripped."""
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def answer_under(
    model: PreTrainedModel,
    tokenizer: Any,
    hooks: AbstractContextManager,
    prompt: PromptIds,
    protocol: str,
    max_new_tokens: int,
) -> str:
    """One greedy answer with ``hooks`` (e.g. a kvpress press applied to ``model``) active during
    the prefill of a fresh cache, then decoded from that cache: how the benchmark scripts run
    another library's eviction on this harness's prompts."""
    cache = DynamicCache()
    with torch.inference_mode(), hooks:
        last_logits = prefill(model, prefill_ids(prompt, protocol), cache)
    (answer,) = decode(model, tokenizer, [cache], prompt, protocol, last_logits, max_new_tokens)
    return answer


def decoding_start(
    prompt: PromptIds, protocol: str, last_logits: torch.Tensor
) -> tuple[int, dict[str, torch.Tensor]]:
    """Where decoding continues under ``protocol`` and what it starts from: after the whole
    prompt from the prefill's last logits (``query_aware``), or after the context by feeding
    the question (``context_only``); as keyword arguments of the greedy decoders."""
    if protocol == "query_aware":
        return prompt.length, {"next_token_logits": last_logits}
    return prompt.context_ids.shape[1], {"input_ids": prompt.question_ids}


def generate_one(
    model: PreTrainedModel,
    tokenizer: Any,
    method: EvictionMethod,
    budget: Budget | None,
    protocol: str,
    prompt: PromptIds,
    max_new_tokens: int,
    stream: StreamSettings | None = None,
    quantization: CacheQuantization | None = None,
    measure_bytes: bool = False,
) -> tuple[str, CompressionRecord]:
    """Prefill with eviction under ``protocol``, then decode greedily; with active ``stream``
    settings the prompt is read in chunks and generation compressed as it goes
    (:mod:`capkv.engine.streaming`); with active ``quantization`` the compressed cache is
    decoded from quantized storage (:func:`stored`; ``measure_bytes`` notes the bytes held)."""
    cache = DynamicCache()
    if stream is not None and stream.active:
        with streamed(model, method, budget, settings=stream) as streamer:
            last_logits = streamer.prefill(prefill_ids(prompt, protocol), cache)
            (prediction,) = decode(
                model, tokenizer, [cache], prompt, protocol, last_logits, max_new_tokens
            )
        return prediction, streamer.record
    with evict(model, method, budget=budget) as record:
        last_logits = prefill(model, prefill_ids(prompt, protocol), cache)
        cache = stored(cache, record, quantization, measure_bytes)
        (prediction,) = decode(
            model, tokenizer, [cache], prompt, protocol, last_logits, max_new_tokens
        )
    return prediction, record


def stored(
    cache: Cache,
    record: CompressionRecord,
    quantization: CacheQuantization | None,
    measure_bytes: bool = False,
) -> Cache:
    """The compressed ``cache`` as decoding reads it: itself, or (with active ``quantization``)
    a quantized copy. Quantized or with ``measure_bytes`` (a run budgeting bytes), the bytes it
    holds are noted in ``record``."""
    quantized = quantization is not None and quantization.active
    if not quantized and not measure_bytes:
        return cache
    held = quantized_cache(cache, quantization) if quantized else cache
    layers, heads, _, head_dim = len(cache.layers), *cache.layers[0].keys.shape[1:]
    record.kv_bytes = held_bytes(held)
    record.kv_bytes_per_head_layer = per_head_layer(record.kv_bytes, layers, heads)
    reference = layers * heads * 2 * record.prompt_length * head_dim * REFERENCE_BITS // 8
    record.kv_fraction_held = round(record.kv_bytes / reference, 6)
    return held


def max_prompt_tokens(model: PreTrainedModel, tokenizer: Any) -> int:
    """Longest user text (in tokens) that fits the model with its template and an answer: the
    limit every task receives."""
    window = model.config.max_position_embeddings
    return prompt_limit(window, MAX_NEW_TOKENS_CAP, prompt_overhead(tokenizer))


def text_limit(model: PreTrainedModel, tokenizer: Any, task: Task) -> int:
    """The limit a task's examples receive: for a reading task (one with ``evaluate``, whose
    text is read alone, with no template and no answer) every position of the model, else
    :func:`max_prompt_tokens`."""
    if getattr(task, "evaluate", None) is not None:
        return model.config.max_position_embeddings
    return max_prompt_tokens(model, tokenizer)


def check_fits(model: PreTrainedModel, example: Example, prompt: PromptIds) -> None:
    """Raise when a tokenised prompt leaves too few of the model's positions for its answer."""
    window = model.config.max_position_embeddings
    if prompt.length > prompt_limit(window, example.max_new_tokens):
        needed = prompt.length + example.max_new_tokens
        raise ValueError(
            f"Example {example.example_id} needs {needed} positions ({prompt.length} prompt + "
            f"{example.max_new_tokens} new tokens) but the model allows {window}: choose shorter "
            "context lengths or a model with a longer window."
        )


@dataclass
class ExamplePlan:
    """What one process runs of a task: every example id of the task, in its order (what a
    cell holds when all its shards are done), and the examples of its own shard with their
    token ids."""

    example_ids: list[str]
    prepared: list[tuple[Example, PromptIds]]


def prepared_examples(
    model: PreTrainedModel, tokenizer: Any, task: Task, shard: Shard = UNSHARDED
) -> ExamplePlan:
    """The examples of ``task`` in ``shard`` with their token ids, all checked to fit before any
    is run."""
    examples = list(task.examples(tokenizer, text_limit(model, tokenizer, task)))
    prepared = []
    for example in select_shard(examples, shard):
        prompt = tokenize_prompt(tokenizer, example)
        check_fits(model, example, prompt)
        prepared.append((example, prompt))
    return ExamplePlan([example.example_id for example in examples], prepared)


def result_row(
    task: Task,
    example: Example,
    prompt: PromptIds,
    prediction: str,
    record: CompressionRecord,
    seconds: float,
    scores: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One line of ``examples.jsonl``; ``scores`` when the task scored the example itself (a
    reading task, :func:`example_row`), else the task's score of ``prediction``."""
    row = {
        "example_id": example.example_id,
        "subtask": example.metadata.get("subtask"),
        "prediction": prediction,
        "answers": example.answers,
        "scores": task.score(prediction, example) if scores is None else scores,
        "prompt_tokens": prompt.length,
        "kept_tokens_per_layer": record.kept_per_layer(),
        "kept_tokens_per_head": record.kept_per_head(),
        "padded_tokens_per_layer": record.padded_per_layer(),
        "seconds": round(seconds, 3),
        "metadata": example.metadata,
    }
    if record.kv_bytes is not None:  # quantized or byte-budgeted: the bytes held once compressed
        row["kv_bytes"] = record.kv_bytes
        row["kv_bytes_per_head_layer"] = record.kv_bytes_per_head_layer
        row["kv_fraction_held"] = record.kv_fraction_held
    peak = getattr(record, "peak_per_layer", None)
    if peak is not None:  # a streaming pass: the most tokens each layer held at once
        row["peak_tokens_per_layer"] = peak
    return row


def example_row(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    cell: Cell,
    protocol: str,
    example: Example,
    prompt: PromptIds,
) -> dict[str, Any]:
    """Run one example of a cell on its own (no shared prefill) and return its row.

    A task that scores examples itself rather than answers (a reading task such as perplexity)
    defines ``evaluate(model, tokenizer, example, method, budget, stream)`` returning its
    ``(fields, record)``: the row's ``scores`` and any other fields, and the
    :class:`CompressionRecord` of what was kept.
    """
    start = time.perf_counter()
    evaluate = getattr(task, "evaluate", None)
    if evaluate is not None:
        fields, record = evaluate(model, tokenizer, example, cell.method, cell.budget, cell.stream)
        fields = dict(fields)
        prediction, scores = fields.pop("prediction", ""), fields.pop("scores")
        seconds = time.perf_counter() - start
        row = result_row(task, example, prompt, prediction, record, seconds, scores)
        return {**row, **fields}
    prediction, record = generate_one(
        model,
        tokenizer,
        cell.method,
        cell.budget,
        protocol,
        prompt,
        example.max_new_tokens,
        cell.stream,
        cell.quantization,
        cell.measure_bytes,
    )
    seconds = time.perf_counter() - start
    return result_row(task, example, prompt, prediction, record, seconds)


class CellBusy(ValueError):
    """Another process is writing the same cell and shard."""


CELL_LOCK = ".cell.lock"  # one writer of a cell's config.yaml and metrics.json at a time


STREAM_KEYS = ("chunk", "compress_every")  # how a cell streams; older folders lack them (null)
# How a cell stores its cache: absent (null) from the folders of unquantized cells.
STORAGE_KEYS = ("cache",)


def check_same_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    """A directory holding results of other settings is never silently extended.

    A setting the stored config lacks (added to the project after that folder was written)
    matches its default value. The task's settings that only count its examples
    (:func:`~capkv.tasks.base.extent_settings`, e.g. RULER's ``num_examples``) may differ: a run
    with more examples extends the folder, its first examples being the ones already there.
    """
    stored = stored_config(run_dir)
    if stored is None:
        return
    extents = {"task": extent_settings(resolved["task"])}
    differing = [
        f"{section}.{key}"
        for section in ("model", "method", "task")
        for key in sorted(set(stored.get(section, {})) | set(resolved[section]))
        if key not in extents.get(section, ())
        and stored[section].get(key, field_default(resolved[section], key))
        != resolved[section].get(key)
    ]
    differing += [
        key for key in (*STREAM_KEYS, *STORAGE_KEYS) if stored.get(key) != resolved.get(key)
    ]
    if differing:
        raise ValueError(
            f"{run_dir} holds results of other settings (differs in {', '.join(differing)}); "
            "pass variant=NAME to write them elsewhere, or delete that folder."
        )


def field_default(node: dict[str, Any], key: str) -> Any:
    """The default of setting ``key`` of the dataclass a config node's ``_target_`` builds (None
    if it has none)."""
    try:
        cls = get_class(node["_target_"])
    except Exception:
        return None
    for setting in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if setting.name == key and setting.default is not dataclasses.MISSING:
            return setting.default
    return None


def write_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Declare what a cell's folder holds before its first row (checked again here, under the
    cell's lock, in case another process wrote other settings since planning). A setting that
    counts examples keeps the larger of its stored and new values: the folder holds that many."""
    check_same_config(run_dir, resolved)
    stored = (stored_config(run_dir) or {}).get("task", {})
    task = dict(resolved["task"])
    for key in extent_settings(task):
        if isinstance(stored.get(key), int) and isinstance(task.get(key), int):
            task[key] = max(stored[key], task[key])
    write_atomically(run_dir / CONFIG, OmegaConf.to_yaml({**resolved, "task": task}))


class RunLog:
    """The rows of one cell as one shard writes them: what is done (by any shard, with any shard
    count), appending this shard's rows, writing the cell's metrics.

    :meth:`start` claims the (cell, shard) before the first row: an advisory lock that a second
    process is refused (:class:`CellBusy`) and that a dead process releases, then writes
    ``config.yaml`` when a config is given (under the cell's lock). :meth:`close` writes
    ``metrics.json`` from the rows of every shard, under the cell's lock, so shards finishing
    together never lose each other's rows.
    """

    def __init__(
        self,
        run_dir: Path,
        identity: dict[str, Any],
        shard: Shard = UNSHARDED,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.identity = identity
        self.shard = shard
        self.config = config
        self.rows: list[dict[str, Any]] = []
        self.own_rows: list[dict[str, Any]] = []  # this shard's file, read once at the start
        self.done: set[str] = set()
        self.example_ids: list[str] | None = None
        # How the task reports its scores, saved in metrics.json (asked before any work).
        self.reporting: Reporting | None = task_reporting(config["task"]) if config else None
        self._log: ExampleLog | None = None
        self._lock: FileLock | None = None
        self._count_lock: FileLock | None = None

    def start(self, example_ids: list[str]) -> None:
        """Claim this cell and shard for this process; ``example_ids`` are the cell's examples
        (every shard's), in the task's order."""
        try:
            self._lock = FileLock(shard_lock_path(self.run_dir, self.shard)).acquire(blocking=False)
        except LockHeld:
            raise CellBusy(busy_message(self.run_dir, self.shard)) from None
        self.example_ids = example_ids
        try:
            with locked(self.run_dir / CELL_LOCK):
                # Under the cell's lock, so two processes starting together see each other.
                check_one_shard_count(self.run_dir, self.shard)
                count = count_lock_path(self.run_dir, self.shard.count)
                self._count_lock = FileLock(count).acquire(shared=True)
                if self.config is not None:
                    write_config(self.run_dir, self.config)
        except BaseException:
            self._release()
            raise
        self.own_rows = read_rows(self.rows_path)
        self.rows = finished_rows(self.run_dir, known={self.rows_path: self.own_rows})
        self.done = {row["example_id"] for row in self.rows}

    @property
    def rows_path(self) -> Path:
        """This shard's rows file."""
        return self.run_dir / self.shard.rows_file

    def append(self, row: dict[str, Any]) -> None:
        """Append one row and note it as done; an interrupt arriving meanwhile is delivered
        after both, so the metrics written on the way out count every row on disk."""
        if self._log is None:
            self._log = ExampleLog(self.rows_path, self.own_rows)
        with signals_deferred():
            self._log.append(row)
            self.own_rows.append(row)
            self.rows.append(row)
            self.done.add(row["example_id"])

    def close(self) -> dict[str, Any]:
        """Close the file, write the metrics of the cell's rows so far, release the claim."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is None:
            return {}
        try:
            with locked(self.run_dir / CELL_LOCK):
                # Only the other shards' files are read again: they may have grown meanwhile
                # (this shard's rows are own_rows: append updates disk and memory together).
                known = {self.rows_path: self.own_rows}
                self.rows = finished_rows(self.run_dir, order=self.example_ids, known=known)
                if not self.rows:
                    return {}
                return write_metrics(
                    self.run_dir,
                    self.identity,
                    self.rows,
                    n_expected=len(self.example_ids),
                    reporting=self.reporting,
                )
        finally:
            self._release()

    def _release(self) -> None:
        """Drop the claims on the (cell, shard) and on the shard count."""
        for lock in (self._count_lock, self._lock):
            if lock is not None:
                lock.release()
        self._lock = self._count_lock = None


@dataclass
class Cell:
    """One (method, budget) cell of a run: what evicts, how much, the folder it writes, the
    config it is written with, and its :class:`RunLog`.

    Attributes
    ----------
    method : EvictionMethod
        The eviction method (the full cache included).
    budget : Budget or None
        What it keeps; None for a method that does not evict.
    run_dir : Path
        The cell's folder (:func:`capkv.results.store.run_directory`).
    identity : dict
        What ``metrics.json`` says the cell is (model, task, method, budget, protocol).
    shard : Shard
        Which examples this process runs (all of them by default).
    stream : StreamSettings
        How the prompt is read and generation bounded (by default: prefill-time eviction).
    quantization : CacheQuantization
        How the compressed cache is stored (by default: full precision).
    measure_bytes : bool
        Whether its rows record the bytes held (quantized cells and runs budgeting bytes do).
    config : dict or None
        The resolved config, written as ``config.yaml`` before the first row and refused when
        the folder holds results of other settings; its task says how the scores are reported
        (saved in ``metrics.json``). None writes neither.
    """

    method: EvictionMethod
    budget: Budget | None
    run_dir: Path
    identity: dict[str, Any]
    shard: Shard = UNSHARDED
    config: dict[str, Any] | None = None
    stream: StreamSettings = field(default_factory=StreamSettings)
    quantization: CacheQuantization = field(default_factory=CacheQuantization)
    measure_bytes: bool = False
    log: RunLog = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.measure_bytes = self.measure_bytes or self.quantization.active
        self.log = RunLog(self.run_dir, self.identity, self.shard, self.config)

    def decoding_cache(self, full_cache: Cache, record: CompressionRecord) -> Cache:
        """This cell's cache as decoding reads it in a sweep: the entries of the example's
        ``full_cache`` that ``record`` kept, gathered, then stored as the cell stores them
        (:func:`stored`)."""
        return stored(
            gathered_cache(full_cache, record), record, self.quantization, self.measure_bytes
        )


def shard_lock_path(run_dir: Path, shard: Shard) -> Path:
    """The lock one writer of a (cell, shard) holds."""
    return run_dir / f".{shard.rows_file}.lock"


def count_lock_path(run_dir: Path, count: int) -> Path:
    """The lock every process writing a cell as ``count`` shards holds, shared."""
    return run_dir / f".shards-{count}.lock"


def running_shard_counts(run_dir: Path) -> list[int]:
    """The shard counts other processes are writing the cell with now."""
    counts = []
    for path in run_dir.glob(".shards-*.lock"):
        number = path.name.removeprefix(".shards-").removesuffix(".lock")
        if number.isdigit() and is_held(path):
            counts.append(int(number))
    return sorted(counts)


def check_one_shard_count(run_dir: Path, shard: Shard) -> None:
    """Refuse to write a cell that another process is writing under another shard count: each
    process skips the examples done when it starts, so two counts at once could run one example
    twice (one after the other, they never do)."""
    others = [count for count in running_shard_counts(run_dir) if count != shard.count]
    if others:
        raise CellBusy(
            f"Another process is writing {run_dir} as shards={others[0]}, which would run "
            f"examples of shards={shard.count} twice; run it with shards={others[0]} too, or "
            "wait for that run to finish."
        )


def busy_message(run_dir: Path, shard: Shard) -> str:
    what = str(run_dir) if shard.count == 1 else f"{shard.label} of {run_dir}"
    return (
        f"Another process is writing {what}; wait for it to finish (or stop it) before running "
        "it again."
    )


def run_cell(
    model: PreTrainedModel, tokenizer: Any, task: Task, cell: Cell, protocol: str
) -> dict[str, Any]:
    """Run every unfinished example of ``task`` in the cell's shard and write rows and metrics
    into its folder (its config before the first row; see :class:`RunLog`).

    Returns the metrics written.
    """
    check_protocol(protocol)
    plan = prepared_examples(model, tokenizer, task, cell.shard)
    cell.log.start(plan.example_ids)
    done = cell.log.done
    todo = [
        (example, prompt) for example, prompt in plan.prepared if example.example_id not in done
    ]
    if done:
        log.info("%s: %d examples already done, %d to go", cell.run_dir, len(done), len(todo))
    try:
        progress = tqdm(
            todo, desc=f"{cell.identity['method']} {cell.identity['budget']}", unit="example"
        )
        for example, prompt in progress:
            cell.log.append(example_row(model, tokenizer, task, cell, protocol, example, prompt))
    finally:
        metrics = cell.log.close()
    return metrics
