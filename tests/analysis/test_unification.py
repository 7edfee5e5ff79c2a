"""The unification measurement: reference scores, rank agreement, greedy selection on the
objective, and the reductions of the capacity objective that the paper's claim rests on."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from baselines import H2O, RandomEviction, SnapKV, StreamingLLM
from capkv import Budget, CapKV
from capkv.analysis.unification import (
    UnificationProbe,
    check_greedy_cost,
    greedy_capacity,
    greedy_seconds,
    reference_scores,
    spearman,
)
from capkv.capacity import log_det_capacity
from capkv.engine.compression import record_kept
from capkv.engine.hooks import run_with_cache
from tests.conftest import capture_prefill, random_prompt

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("agreement.md", "optimum.md", "agreement.csv", "optimum.csv")


@pytest.fixture(scope="module")
def mha_state(mha_model):
    model, _ = mha_model
    return capture_prefill(model, random_prompt(model.config.vocab_size, 96))[1]


def orthogonal_values(state, norm: float = 2.0):
    """The state with value vectors replaced by orthogonal ones of equal norm (needs T <= d)."""
    bsz, heads, tokens, dim = state.values.shape
    generator = torch.Generator().manual_seed(0)
    values = torch.empty_like(state.values)
    for head in range(heads):
        basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        values[0, head] = norm * basis[:tokens]
    return replace(state, values=values)


def test_spearman_is_one_for_the_same_ranking_minus_one_reversed_and_handles_ties():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0]])
    assert spearman(scores, scores * 10 + 3) == pytest.approx([1.0, 1.0])
    assert spearman(scores, -scores) == pytest.approx([-1.0, -1.0])
    assert math.isnan(spearman(torch.ones(1, 4), scores[:1])[0])


def test_greedy_curve_equals_a_brute_force_greedy_on_the_log_det():
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(2, 12, 4, generator=generator, dtype=torch.float64)
    weights = torch.rand(2, 3, 12, generator=generator, dtype=torch.float64)
    curve = greedy_capacity(values, weights, n_max=6)

    def capacity(head: int, tokens: list[int]) -> float:
        kept = torch.tensor(tokens).expand(3, -1)
        head_values = values[head].expand(3, -1, -1)
        return float(log_det_capacity(head_values, weights[head], kept).mean())

    for head in range(2):
        chosen: list[int] = []
        for step in range(1, 7):
            candidates = [i for i in range(12) if i not in chosen]
            chosen.append(max(candidates, key=lambda i: capacity(head, [*chosen, i])))
            assert float(curve[head, step]) == pytest.approx(capacity(head, chosen), rel=1e-9)


def test_greedy_beats_every_other_set_of_two_on_a_small_pool():
    """Greedy is optimal for the first token and, on this small pool, for two tokens too."""
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(1, 8, 3, generator=generator, dtype=torch.float64)
    weights = torch.rand(1, 1, 8, generator=generator, dtype=torch.float64)
    curve = greedy_capacity(values, weights, n_max=2)
    best_single = max(
        float(log_det_capacity(values[0], weights[0, 0], torch.tensor([i]))) for i in range(8)
    )
    best_pair = max(
        float(log_det_capacity(values[0], weights[0, 0], torch.tensor(pair)))
        for pair in combinations(range(8), 2)
    )
    assert float(curve[0, 1]) == pytest.approx(best_single)
    assert float(curve[0, 2]) >= (1 - 1 / math.e) * best_pair


def test_orthogonal_equal_norm_values_make_capkv_rank_by_relevance_alone(mha_model):
    """Reduction: with orthonormal directions of equal norm c, s_i = w_i c^2 / (1 + (w_i + eps)
    c^2), increasing in w_i, so CapKV's ranking is the relevance ranking (one query head per KV
    head, so no average over a group mixes rankings)."""
    model, _ = mha_model
    state = capture_prefill(model, random_prompt(model.config.vocab_size, 16))[2]
    state = orthogonal_values(state)
    references = reference_scores(state, CapKV())
    scores = CapKV().score(state)[0, :, 4:]
    assert spearman(scores, references["relevance"][0, :, 4:]) == pytest.approx([1.0] * 4)


def test_tau_zero_makes_relevance_uniform_and_capkv_rank_by_leverage_alone(mha_state):
    """Reduction: tau = 0 gives w_i = 1 for every token, so s_i is the plain ridge leverage."""
    query_agnostic = CapKV(tau=0.0)
    assert torch.all(query_agnostic.relevance_weights(mha_state) == 1)
    references = reference_scores(mha_state, CapKV())
    leverage = references["leverage"][0, :, 4:]
    assert spearman(query_agnostic.score(mha_state)[0, :, 4:], leverage) == pytest.approx([1.0] * 4)


def test_a_position_prior_in_place_of_relevance_turns_capkv_into_streamingllm(mha_model):
    """Reduction: with orthogonal equal-norm values and a relevance that grows with position
    (a recency prior), CapKV keeps the most recent tokens behind its sinks, as StreamingLLM."""

    class RecencyCapKV(CapKV):
        def relevance_weights(self, layer):
            positions = torch.arange(layer.prompt_length, dtype=torch.float32) + 1
            return (positions / layer.prompt_length).expand(1, layer.num_kv_heads, 1, -1)

    model, _ = mha_model
    state = orthogonal_values(capture_prefill(model, random_prompt(model.config.vocab_size, 16))[0])
    budget = Budget(tokens=10)
    assert torch.equal(
        RecencyCapKV().kept_indices(state, budget), StreamingLLM().kept_indices(state, budget)
    )


def test_removal_cost_ranks_as_capkv_and_is_the_log_det_lost(mha_state):
    references = reference_scores(mha_state, CapKV())
    removal = references["removal_cost"][0, :, 4:]
    assert torch.isnan(references["removal_cost"][0, :, :4]).all()
    assert spearman(CapKV().score(mha_state)[0, :, 4:], removal) == pytest.approx([1.0] * 4)


def test_probe_reports_agreement_and_capacity_against_greedy(gqa_model):
    model, _ = gqa_model
    methods = {
        "capkv": CapKV(),
        "snapkv": SnapKV(window=8),
        "h2o": H2O(window=8),
        "random": RandomEviction(),
    }
    cells = [(name, "budget24") for name in methods]
    probe = UnificationProbe(methods, cells, layers=[0, 3])
    with (
        torch.no_grad(),
        record_kept(model, [(m, Budget(tokens=24)) for m in methods.values()], probe.on_layer),
    ):
        run_with_cache(model, random_prompt(model.config.vocab_size, 80), DynamicCache())
    layers = {row["layer"] for row in probe.agreement}
    assert layers == {0, 3}
    capkv_cost = [
        r["spearman"]
        for r in probe.agreement
        if r["method"] == "capkv" and r["reference"] == "removal_cost"
    ]
    # CapKV averages s_i over the 2 query heads of a KV head, the reference averages
    # -log(1 - s_i): the same ranking up to near-ties.
    assert min(capkv_cost) > 0.99
    random_cost = [
        r["spearman"]
        for r in probe.agreement
        if r["method"] == "random" and r["reference"] == "removal_cost"
    ]
    assert max(abs(v) for v in random_cost) < 0.5
    assert len(probe.optimum) == 4 * 2 * 2  # cells x layers x KV heads
    for row in probe.optimum:
        assert row["kept"] == 24
        # Greedy reaches 1 - 1/e of the optimum, which bounds every set of the same size.
        assert 0 < row["capacity"] <= row["greedy_capacity"] / (1 - 1 / math.e) + 1e-6


def test_an_hour_long_greedy_request_is_refused_with_the_estimate_and_what_to_do():
    seconds = greedy_seconds(layers=32, kv_heads=8, group=4, tokens=32768, n_max=16384, dim=128)
    with pytest.raises(ValueError, match=r"about [\d.]+ hours per prompt: sample fewer layers"):
        check_greedy_cost(seconds, limit_minutes=30)
    check_greedy_cost(greedy_seconds(2, 2, 2, 100, 50, 16), limit_minutes=1)


def run_script(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(ROOT / "scripts" / "unification.py"),
        "--model=tiny-random",
        "--tasks",
        "needle_grid",
        "--task-overrides",
        "task.context_lengths=[300]",
        "--prompts=1",
        f"--results={tmp_path / 'results'}",
        f"--plots={tmp_path / 'plots'}",
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_the_script_writes_tables_and_figures_and_redraws_them_alike(tmp_path):
    result = run_script(tmp_path, "--layers", "0", "3", "--ratios", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    tables = {name: (tmp_path / "results" / name).read_text() for name in TABLES}
    assert "| capkv | 1.00 |" in tables["agreement.md"]
    assert (tmp_path / "plots" / "agreement_by_layer.png").stat().st_size > 0
    assert (tmp_path / "plots" / "capacity_vs_score.png").stat().st_size > 0
    redrawn = run_script(tmp_path, "--redraw")
    assert redrawn.returncode == 0, redrawn.stderr[-3000:]
    assert {name: (tmp_path / "results" / name).read_text() for name in TABLES} == tables


def test_the_script_refuses_an_hour_long_greedy_in_one_line(tmp_path):
    result = run_script(tmp_path, "--max-greedy-minutes=0.00001")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: The greedy selection would")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()
