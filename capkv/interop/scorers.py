"""Every kvpress scorer press as an eviction method of this harness (``method=kvpress``).

A kvpress *scorer press* compresses by scoring every cached token and keeping the top ones
(``ScorerPress.compress``). Its ``score(module, hidden_states, keys, values, attentions,
kwargs)`` reads nothing but one layer's prefill state, which :class:`capkv.engine.layer.LayerPrefill`
holds, so the press's own ``score`` can rank tokens here, in sweeps too (one prefill for many
presses and budgets), under both budget conventions and both protocols. The engine then keeps
the same top-k kvpress keeps (``tests/interop/test_kvpress_scorers.py`` checks every supported press
against kvpress's own hooks, in every layer and KV head).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from capkv.engine.budget import Budget
from capkv.engine.layer import LayerPrefill
from capkv.engine.method import EvictionMethod
from capkv.interop.environment import import_kvpress

# Scorer presses of kvpress 0.5.5 that score from one layer's prefill state alone.
SUPPORTED_PRESSES = (
    "CapPress",
    "CompactorPress",
    "CURPress",
    "ExpectedAttentionPress",
    "KeyDiffPress",
    "KnormPress",
    "LagKVPress",
    "LeverageScorePress",
    "NonCausalAttnPress",
    "ObservedAttentionPress",
    "PyramidKVPress",
    "RandomPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
)
# Scorers whose score reads weights or statistics that kvpress downloads from the Hugging Face hub.
HUB_PRESSES = ("ExpectedAttentionStatsPress", "KVzapPress", "QFilterPress")
# Presses that score a growing cache from the queries of the tokens read since the last
# compression (streaming mode; the others assert a prefill or a query window of 64 tokens).
STREAMING_PRESSES = (
    "CapPress",
    "CURPress",
    "ExpectedAttentionPress",
    "KeyDiffPress",
    "KnormPress",
    "LagKVPress",
    "RandomPress",
    "StreamingLLMPress",
    "TOVAPress",
)
NEEDS_ATTENTIONS = ("ObservedAttentionPress",)  # asserts the layer returned attention weights
# Presses whose scores depend on the compression ratio (StreamingLLM's recent window, Compactor's
# default blending): scored once per budget, not once per layer.
RATIO_DEPENDENT = ("CompactorPress", "StreamingLLMPress")


def short_name(press: str) -> str:
    """``TOVAPress`` -> ``tova``: how a press is named in ``methods=[kvpress-tova]`` and folders."""
    return press.removesuffix("Press").lower()


def press_class_name(name: str) -> str:
    """The supported class a press name means (``TOVAPress``, ``tova`` or ``kvpress-tova``).

    Raises
    ------
    ValueError
        For a press that is not a supported scorer, listing the supported ones.
    """
    wanted = name.removeprefix("kvpress-")
    for press in SUPPORTED_PRESSES:
        if wanted in (press, short_name(press)):
            return press
    supported = ", ".join(SUPPORTED_PRESSES)
    if wanted in HUB_PRESSES:
        why = "scores with weights kvpress downloads from the Hugging Face hub, which this harness does not do"
    else:
        why = "is not a kvpress scorer press this harness supports (score every token, keep the top ones)"
    raise ValueError(f"kvpress press {name!r} {why}; choose one of: {supported}.")


def press_ratio(budget: Budget, prompt_length: int) -> float:
    """The compression ratio kvpress needs to keep what ``budget`` keeps of the prompt."""
    if budget.ratio is not None:
        return budget.ratio
    n_kept = budget.n_kept(prompt_length)
    ratio = (prompt_length - n_kept) / prompt_length
    while ratio > 0 and int(prompt_length * (1 - ratio)) < n_kept:  # float rounding
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def build_press(class_name: str, kwargs: dict[str, Any]) -> Any:
    """An instance of kvpress's ``class_name`` with ``kwargs``; one sentence for a bad key."""
    kvpress = import_kvpress(f"method=kvpress method.press={class_name}")
    press_class = getattr(kvpress, class_name)
    settings = [f.name for f in dataclasses.fields(press_class) if f.init]
    settings = [
        name for name in settings if name != "compression_ratio" and not name.startswith("_")
    ]
    for key in kwargs:
        if key == "compression_ratio":
            raise ValueError(
                "method.kwargs.compression_ratio is not a press setting here: the budget comes "
                "from budget=N or ratio=R (budgets=[...], ratios=[...] in a sweep)."
            )
        if key not in settings:
            raise ValueError(
                f"{class_name} has no setting {key!r}; its settings are: "
                f"{', '.join(settings) or 'none'}. Fix method.kwargs."
            )
    try:
        return press_class(**kwargs)
    except (AssertionError, TypeError, ValueError) as error:
        raise ValueError(
            f"{class_name} refused method.kwargs={kwargs}: {error or 'invalid value'}."
        ) from None


@contextmanager
def rotary_attached(module: nn.Module, rotary_emb: nn.Module) -> Iterator[None]:
    """Give ``module`` a ``rotary_emb`` while a press scores (kvpress attaches it the same way)."""
    if hasattr(module, "rotary_emb"):
        yield
        return
    module.rotary_emb = rotary_emb
    try:
        yield
    finally:
        del module.rotary_emb


@contextmanager
def seeded(seed: int | None, layer: LayerPrefill) -> Iterator[None]:
    """Draws of a press (random projections, RandomPress) from ``seed``, the layer and the prompt
    length, as :class:`baselines.RandomEviction` draws; ``None``: torch's global generator."""
    if seed is None:
        yield
        return
    devices = [layer.keys.device] if layer.keys.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(hash((seed, layer.layer_idx, layer.prompt_length)) % 2**63)
        yield


@dataclass
class KvpressMethod(EvictionMethod):
    """A kvpress scorer press as an eviction method: its own ``score``, our engine's top-k.

    Parameters
    ----------
    press : str
        The press's class name in kvpress (``TOVAPress``) or its short name (``tova``); one of
        :data:`SUPPORTED_PRESSES`.
    kwargs : dict or None
        The press's settings (``window_size``, ``n_sink``...), its defaults otherwise. The
        compression ratio is not one: it comes from the run's budget.
    seed : int or None
        Seed of the press's random draws, per layer and prompt length, so sweeps and separate
        runs keep the same tokens; None draws from torch's global generator, as kvpress does.

    The results folder is ``kvpress-<short name>`` (e.g. ``kvpress-tova``). A budget in tokens
    is given to the press as the ratio that keeps that many tokens. ``ObservedAttentionPress``
    needs the attention weights, which only eager attention returns.
    """

    press: str | None = None
    kwargs: dict[str, Any] | None = None
    seed: int | None = 0
    scorer: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.press:
            raise ValueError(
                "method=kvpress needs method.press=<press>; choose one of: "
                f"{', '.join(SUPPORTED_PRESSES)}."
            )
        self.press = press_class_name(self.press)
        self.kwargs = dict(self.kwargs or {})
        self.scorer = build_press(self.press, self.kwargs)

    @property
    def folder_name(self) -> str:
        """The method's name in results folders and tables, e.g. ``kvpress-tova``."""
        return f"kvpress-{short_name(self.press)}"

    @property
    def streaming_refusal(self) -> str | None:
        """Why the press cannot compress a growing cache (:mod:`capkv.engine.streaming`), or None."""
        if self.press in STREAMING_PRESSES:
            return None
        return (
            f"{self.press} scores only a whole prefill (its own check, a window of queries "
            "longer than a chunk, or attention weights), so it does not stream; the presses that "
            f"do: {', '.join(STREAMING_PRESSES)}"
        )

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        if self.press in NEEDS_ATTENTIONS and layer.attentions is None:
            raise ValueError(
                f"{self.press} scores from the attention weights, which only eager attention "
                "returns: pass model.attn_implementation=eager."
            )
        kwargs = {"position_embeddings": (layer.cos, layer.sin)}
        with rotary_attached(layer.module, layer.rotary_emb), seeded(self.seed, layer):
            return self.scorer.score(
                layer.module,
                layer.hidden_states,
                layer.keys,
                layer.values,
                layer.attentions,
                kwargs,
            )

    def kept_count(self, layer: LayerPrefill, budget: Budget) -> int | None:
        self.scorer.compression_ratio = press_ratio(budget, layer.prompt_length)
        return super().kept_count(layer, budget)

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_length: int, n_kept: int) -> int:
        """PyramidKVPress's own per-layer count (its float schedule); the budget otherwise."""
        if self.press != "PyramidKVPress":
            return n_kept
        module = SimpleNamespace(
            layer_idx=layer_idx, config=SimpleNamespace(num_hidden_layers=num_layers)
        )
        return self.scorer.get_layer_budget(module, prompt_length)

    def kept_indices(
        self, layer: LayerPrefill, budget: Budget, scores: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if self.press in RATIO_DEPENDENT:
            scores = None  # scored again under this budget's ratio (set by kept_count)
        return super().kept_indices(layer, budget, scores)
