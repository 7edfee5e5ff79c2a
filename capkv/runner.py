"""Run one (model, task, method, budget, protocol) cell: prefill, evict, decode, score, log."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel

from capkv.budget import Budget
from capkv.decoding import greedy_generate
from capkv.engine import evict
from capkv.method import EvictionMethod
from capkv.prompting import PromptIds, prompt_overhead, tokenize_prompt
from capkv.results import ExampleLog, finished_rows, write_metrics
from capkv.tasks.base import Example, Task

log = logging.getLogger(__name__)

PROTOCOLS = ("query_aware", "context_only")


@dataclass
class Generation:
    """What one example produced."""

    prediction: str
    prompt_tokens: int
    kept_tokens_per_layer: list[int]


def stop_token_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate_one(
    model: PreTrainedModel,
    tokenizer: Any,
    method: EvictionMethod,
    budget: Budget | None,
    protocol: str,
    prompt: PromptIds,
    max_new_tokens: int,
) -> Generation:
    """Prefill with eviction under ``protocol``, then decode greedily."""
    device = model.device
    cache = DynamicCache()
    stops = stop_token_ids(model, tokenizer)
    with evict(model, method, budget=budget) as record:
        if protocol == "query_aware":
            logits = model(
                input_ids=prompt.full().to(device), past_key_values=cache, logits_to_keep=1
            ).logits[0, -1]
            tokens = greedy_generate(
                model, cache, prompt.length, max_new_tokens, stops, next_token_logits=logits
            )
        else:
            model.model(input_ids=prompt.context_ids.to(device), past_key_values=cache)
            tokens = greedy_generate(
                model,
                cache,
                prompt.context_ids.shape[1],
                max_new_tokens,
                stops,
                input_ids=prompt.question_ids,
            )
    return Generation(
        prediction=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
        prompt_tokens=prompt.length,
        kept_tokens_per_layer=record.kept_per_layer(),
    )


def max_prompt_tokens(model: PreTrainedModel, tokenizer: Any, max_new_tokens: int) -> int:
    """Longest user text (in tokens) that fits the model with its template and answer."""
    return model.config.max_position_embeddings - max_new_tokens - prompt_overhead(tokenizer)


def check_fits(model: PreTrainedModel, example: Example, prompt: PromptIds) -> None:
    limit = model.config.max_position_embeddings
    needed = prompt.length + example.max_new_tokens
    if needed > limit:
        raise ValueError(
            f"Example {example.example_id} needs {needed} positions ({prompt.length} prompt + "
            f"{example.max_new_tokens} new tokens) but the model allows {limit}: choose shorter "
            "context lengths or a model with a longer window."
        )


def run_cell(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    method: EvictionMethod,
    budget: Budget | None,
    protocol: str,
    run_dir,
    identity: dict[str, Any],
    max_new_tokens_cap: int = 512,
) -> dict[str, Any]:
    """Run every unfinished example of ``task`` and write rows and metrics into ``run_dir``.

    Returns the metrics written.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    rows = finished_rows(run_dir)
    done = {row["example_id"] for row in rows}
    limit = max_prompt_tokens(model, tokenizer, max_new_tokens_cap)
    todo = [
        example for example in task.examples(tokenizer, limit) if example.example_id not in done
    ]
    prompts = [tokenize_prompt(tokenizer, example) for example in todo]
    for example, prompt in zip(todo, prompts, strict=True):
        check_fits(model, example, prompt)
    if done:
        log.info("%s: %d examples already done, %d to go", run_dir, len(done), len(todo))
    example_log = ExampleLog(run_dir, rows)
    metrics: dict[str, Any] = {}
    try:
        progress = tqdm(todo, desc=f"{identity['method']} {identity['budget']}", unit="example")
        for example, prompt in zip(progress, prompts, strict=True):
            start = time.perf_counter()
            generation = generate_one(
                model, tokenizer, method, budget, protocol, prompt, example.max_new_tokens
            )
            row = {
                "example_id": example.example_id,
                "subtask": example.metadata.get("subtask"),
                "prediction": generation.prediction,
                "answers": example.answers,
                "scores": task.score(generation.prediction, example),
                "prompt_tokens": generation.prompt_tokens,
                "kept_tokens_per_layer": generation.kept_tokens_per_layer,
                "seconds": round(time.perf_counter() - start, 3),
                "metadata": example.metadata,
            }
            example_log.append(row)
            rows.append(row)
    finally:
        example_log.close()
        if rows:
            metrics = write_metrics(run_dir, identity, rows)
    return metrics
