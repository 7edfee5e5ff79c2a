"""Our eviction methods as kvpress presses (``as_press``): alone, in kvpress's pipeline, and
under kvpress's wrappers (``docs/kvpress.md`` lists what works under which wrapper).

Imports kvpress: reach it through :func:`capkv.interop.as_press`, which says how to install
kvpress where it is missing.

A press follows kvpress's conventions where it stands in for a kvpress press: a ratio keeps
``max(1, int(T (1 - ratio)))`` tokens (none at a ratio of 1, which ``PerLayerCompressionPress``
may give a layer), and a count below the method's protected tokens keeps the best of them instead
of raising. Under a wrapper it either keeps what kvpress's own corresponding press would keep
there, or refuses in one line when applied, saying why: nothing is silently left uncompressed or
given another budget.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from kvpress import BasePress, ScorerPress
from kvpress.presses.base_press import is_prefilling
from torch import nn
from transformers import PreTrainedModel

from baselines.random_eviction import RandomEviction
from baselines.snapkv import SnapKV
from baselines.streamingllm import StreamingLLM
from capkv.cap import CapKV
from capkv.engine.budget import Budget
from capkv.engine.compression import gather_tokens
from capkv.engine.hooks import attention_layers, rotary_embedding
from capkv.engine.layer import LayerPrefill
from capkv.engine.method import EvictionMethod

# Wrappers that call our press's ``score`` and keep a count of their own choosing per layer
# (or per piece of the prompt): a per-layer schedule (PyramidKV's) cannot survive them.
RANKING_WRAPPERS = (
    "AdaKVPress",
    "BlockPress",
    "CAMPress",
    "ChunkKVPress",
    "ChunkPress",
    "CriticalAdaKVPress",
    "CriticalKVPress",
    "EntropyGatedChunkKVPress",
    "KeyRerotationPress",
    "MergingPress",
)
# Wrappers that give our press a ratio of their own per layer or per decoding compression.
REBUDGETING_WRAPPERS = (
    "CompressionRatioDecodingPress",
    "DecodingPress",
    "PerLayerCompressionPress",
)
# Wrappers that run our press as it runs alone (its own budget and schedule).
TRANSPARENT_WRAPPERS = ("ComposedPress", "PrefillDecodingPress")
# Wrappers that score pieces of the prompt (chunks, blocks of gathered tokens) with the whole
# prompt's rotary tables: only methods that read no query positions score those right.
PIECEWISE_WRAPPERS = ("BlockPress", "ChunkPress")
POSITION_FREE = (CapKV, StreamingLLM, RandomEviction)
# Methods that score a cache already compressed by an earlier press of a ComposedPress as
# kvpress's own presses do (the last tokens' queries, or recency): the others need the prompt's
# whole cache (H2O's causal attention of every query, CapKV's sinks and query anchor).
PARTIAL_CACHE_OK = (SnapKV, StreamingLLM, RandomEviction)


def wrapping_press(press: BasePress) -> BasePress | None:
    """The nearest kvpress press other than ``press`` whose method is running on the call stack:
    the wrapper that called ``press``, or None when ``press`` runs alone (``with press(model)``,
    kvpress's pipeline).

    kvpress gives a press no handle on the wrapper calling it, and what a press may do depends
    on it (a budget under a ratio wrapper, a schedule under a ranking one): the wrapper's method
    is on the call stack, its ``self`` the wrapper."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, BasePress) and owner is not press:
            return owner
        frame = frame.f_back
    return None


def has_layer_schedule(method: EvictionMethod) -> bool:
    """Whether ``method`` keeps its own number of tokens in each layer (PyramidKV)."""
    return type(method).layer_budget is not EvictionMethod.layer_budget


def wrapper_refusal(
    wrapper: BasePress | None, method: EvictionMethod, budget: int | None
) -> str | None:
    """Why ``method`` as a press cannot run under ``wrapper`` (None: it can)."""
    if wrapper is None:
        return None
    name, method_name = type(wrapper).__name__, type(method).__name__
    if name == "LUKVPress":
        return (
            "LUKVPress reads per-head budget curves that kvpress downloads for the (model, press) "
            "pairs it lists, and it lists none for our presses"
        )
    if name == "DMSPress":
        return (
            "DMSPress evicts a token when its score falls below a fixed threshold, which needs "
            f"scores on an absolute scale (KVzap's); {method_name}'s scores only rank the tokens "
            "of one layer against each other"
        )
    if budget is not None and name != "PrefillDecodingPress":
        return budget_refusal(budget, name)
    if has_layer_schedule(method) and name not in TRANSPARENT_WRAPPERS:
        return (
            f"{name} keeps a number of tokens of its own in every layer, which would drop "
            f"{method_name}'s per-layer schedule: wrap SnapKV(...) instead, or use "
            f"as_press({method_name}(...)) alone"
        )
    if name in PIECEWISE_WRAPPERS and not isinstance(method, POSITION_FREE):
        return (
            f"{name} scores pieces of the prompt with the whole prompt's rotary tables, so "
            f"{method_name}'s queries would be rotated to the wrong positions; under {name} use "
            "CapKV or StreamingLLM"
        )
    if name not in (*RANKING_WRAPPERS, *REBUDGETING_WRAPPERS, *TRANSPARENT_WRAPPERS):
        return (
            f"{name} is not a kvpress 0.5.5 wrapper that as_press was tested under "
            "(docs/kvpress.md lists them)"
        )
    return None


def budget_refusal(budget: int, wrapper: str) -> str:
    """Why a budget press cannot run under ``wrapper``, which works with ratios."""
    return (
        f"as_press(..., budget={budget}) keeps a token budget, which {wrapper} cannot honour (it "
        "works with the press's compression_ratio): give as_press a compression_ratio instead, "
        "or use the budget press alone"
    )


def kept_count(prompt_length: int, ratio: float) -> int:
    """kvpress's number of kept tokens: ``max(1, int(T (1 - ratio)))``, none at a ratio of 1."""
    if ratio >= 1.0:
        return 0
    return max(1, int(prompt_length * (1.0 - ratio)))


def ranked_scores(scores: torch.Tensor, n_first: int, n_last: int) -> torch.Tensor:
    """``scores`` with the protected tokens above every other, as kvpress pads its presses'
    protected tokens (``max + 1``, the maximum over the whole batch and every head); protected
    tokens are ranked among themselves by their own scores (all equal where a method gives them
    none, as SnapKV's window and CapKV's sinks)."""
    scores = scores.float().clone()
    length = scores.shape[-1]
    protected = torch.zeros(length, dtype=torch.bool, device=scores.device)
    protected[:n_first] = True
    protected[length - n_last :] = True
    if not protected.any():
        return scores
    free = scores[..., ~protected]
    top = free.max() if free.numel() else scores.new_zeros(())
    own = scores[..., protected]
    scores[..., protected] = top + 1 + (own - own.min())
    return scores


def best_protected(scores: torch.Tensor, n_kept: int, n_first: int, n_last: int) -> torch.Tensor:
    """Sorted indices (B, H_kv, n_kept) of the best of the protected tokens, for a count below
    them: ranked by the method's own scores, ties (tokens a method does not score, as SnapKV's
    window and CapKV's sinks) going to the earliest sinks, then to the most recent window
    tokens. kvpress keeps as many of its protected tokens, chosen among equal scores by top-k."""
    length = scores.shape[-1]
    positions = torch.arange(length, device=scores.device)
    protected = (positions < n_first) | (positions >= length - n_last)
    candidates = positions[protected]
    preference = torch.where(candidates < n_first, length - candidates, candidates)
    by_preference = candidates[preference.argsort()]  # ascending
    own = scores[..., by_preference]
    order = by_preference[own.argsort(dim=-1, stable=True)]  # ascending: best last
    return order[..., order.shape[-1] - n_kept :].sort(dim=-1).values


@dataclass(eq=False, repr=False)
class MethodPress(ScorerPress):
    """A kvpress press that keeps, in every layer, what our engine keeps with ``method``.

    Parameters
    ----------
    method : EvictionMethod
        CapKV or a baseline (H2O, SnapKV, PyramidKV, StreamingLLM...), with its settings, under
        ``allocation=uniform`` (kvpress's ``AdaKVPress`` gives head-adaptive allocations).
    compression_ratio : float
        Fraction of the prompt removed (kvpress's convention, as ``ratio=`` here), in [0, 1).
    budget : int, optional
        Tokens kept per KV head per layer instead of a ratio (our ``budget=``). A wrapper reading
        the press's ``compression_ratio`` is refused in one line.

    ``compress`` keeps ``method``'s own choice: its protected tokens, its per-layer budget
    (PyramidKV's schedule), its top-k. ``score`` gives its scores with protected tokens above
    every other (kvpress's ``max + 1``), for the wrappers that rank by a press's scores
    (AdaKVPress, CriticalKVPress...); a method without scores (StreamingLLM) scores 1 the tokens
    it keeps at the current ratio and 0 the others, as kvpress's StreamingLLMPress does. Hidden
    states buffered by a decoding wrapper are scored at their own positions.
    """

    method: EvictionMethod | None = None
    compression_ratio: float = 0.0
    budget: int | None = None
    num_layers: int = field(default=0, init=False)
    rotary_emb: nn.Module | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.method, EvictionMethod):
            raise ValueError(
                f"as_press needs an eviction method (CapKV, H2O, SnapKV...), got {self.method!r}."
            )
        if self.method.allocation != "uniform":
            raise ValueError(
                f"as_press keeps one number of tokens per KV head, so allocation="
                f"{self.method.allocation} is refused: wrap the uniform method in kvpress's "
                f"AdaKVPress for a head-adaptive allocation, e.g. AdaKVPress(as_press("
                f"{type(self.method).__name__}(), compression_ratio=0.5))."
            )
        if self.budget is None and not 0.0 <= self._ratio < 1.0:
            raise ValueError(
                f"compression_ratio must lie in [0, 1) (the fraction removed), got {self._ratio}."
            )
        self.method.check_budget(self.size())

    def __repr__(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self._ratio}"
        return f"MethodPress({self.method!r}, {size})"

    def size(self) -> Budget:
        """The budget the press keeps: ``budget`` tokens, else ``compression_ratio``."""
        if self.budget is not None:
            return Budget(tokens=self.budget)
        return Budget(ratio=self._ratio)

    def refuse_wrapper(self) -> None:
        """Raise, in one line, if the press runs under a wrapper it cannot serve."""
        reason = wrapper_refusal(wrapping_press(self), self.method, self.budget)
        if reason is not None:
            raise ValueError(f"{reason}.")

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        self.refuse_wrapper()
        self.num_layers = len(attention_layers(model))
        self.rotary_emb = rotary_embedding(model)

    def layer_state(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> LayerPrefill:
        """The state our methods read, from what kvpress gives a press.

        kvpress gives the rotary tables of the current forward; hidden states buffered by a
        decoding wrapper (the last ``n`` tokens read) get the tables of their own positions.
        """
        rotary_emb = getattr(module, "rotary_emb", None) or self.rotary_emb
        if rotary_emb is None:
            raise ValueError(
                "This press was not applied to a model: use it as `with press(model):`, through "
                "kvpress's pipeline, or inside a kvpress wrapper applied to a model."
            )
        num_layers = self.num_layers or module.config.num_hidden_layers
        cos, sin = kwargs["position_embeddings"]
        observed, seen = hidden_states.shape[1], None
        cache_position = kwargs.get("cache_position")
        decoding = cache_position is not None and not is_prefilling(
            cache_position, kwargs["hidden_states"].shape[1]
        )
        if decoding:
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = cache_position.unsqueeze(0).expand(hidden_states.shape[0], -1)
            cos, sin, seen = self.buffered_tables(rotary_emb, hidden_states, cos, positions)
        elif cos.shape[1] != observed:  # a piece of the prompt (position-free methods only)
            cos, sin = cos[:, -observed:], sin[:, -observed:]
        if (
            not decoding
            and observed > keys.shape[2]
            and not isinstance(self.method, PARTIAL_CACHE_OK)
        ):
            raise ValueError(
                f"{type(self.method).__name__} as a later press of a ComposedPress would score a "
                f"cache that an earlier press compressed ({keys.shape[2]} of {observed} tokens), "
                "but it reads the whole prompt's cache: put it first."
            )
        if decoding and isinstance(self.method, SnapKV) and observed < self.method.window:
            raise ValueError(
                f"{type(self.method).__name__}'s window of {self.method.window} queries needs the "
                f"decoding wrapper to buffer at least {self.method.window} hidden states, it gave "
                f"{observed}: raise hidden_states_buffer_size and compression_interval."
            )
        return LayerPrefill(
            module=module,
            rotary_emb=rotary_emb,
            num_layers=num_layers,
            hidden_states=hidden_states,
            keys=keys,
            values=values,
            cos=cos,
            sin=sin,
            attentions=attentions,
            seen=seen,
        )

    @staticmethod
    def buffered_tables(
        rotary_emb: nn.Module,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rotary tables of buffered hidden states, the last ``n`` tokens read before and with
        the current ones (at ``positions``, (B, q)), and the number of tokens read.

        The positions are the model's (kvpress's pipeline passes them after compressing the
        context, where they run ahead of the cache's indices); rows at different positions (a
        padded batch) are refused."""
        observed = hidden_states.shape[1]
        last = positions[:, -1:]
        if not bool((last == last[0]).all()):
            raise ValueError(
                "A decoding wrapper's buffered hidden states are scored as the tokens read so "
                "far, which differ between the rows of this batch (left padding?): decode one "
                "prompt at a time."
            )
        offsets = torch.arange(1 - observed, 1, device=positions.device)
        own_cos, own_sin = rotary_emb(hidden_states, last + offsets)
        current = cos.shape[1]
        if not torch.allclose(own_cos[:, -current:].to(cos.dtype), cos, atol=1e-5):
            raise ValueError(
                "The rotary tables of this forward are not those of its position_ids, so a "
                "decoding wrapper's buffered hidden states cannot be given their positions."
            )
        return own_cos.to(cos.dtype), own_sin.to(cos.dtype), int(last[0]) + 1

    def target_count(self, prompt_length: int) -> int | None:
        """Tokens kept per KV head of a cache of ``prompt_length`` (None: all of them)."""
        if self.budget is not None:
            n_kept = self.budget
        elif self._ratio == 0:
            return None
        else:
            n_kept = kept_count(prompt_length, self._ratio)
        return None if n_kept >= prompt_length else n_kept

    def kept_indices(self, state: LayerPrefill, n_kept: int) -> torch.Tensor | None:
        """Sorted kept indices (B, H_kv, n): the engine's choice, or, for fewer tokens than the
        method protects, the best of its protected tokens (:func:`best_protected`)."""
        n_first, n_last = self.method.protected(state.prompt_length)
        if n_kept >= max(1, n_first + n_last):
            return self.method.kept_indices(state, Budget(tokens=n_kept))
        if self.method.comparable_across_heads is None:  # no scores: position only
            scores = state.keys.new_zeros(state.keys.shape[:3], dtype=torch.float32)
        else:
            scores = self.method.score(state).float()
        return best_protected(scores, n_kept, n_first, n_last)

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        self.refuse_wrapper()
        wrapper = wrapping_press(self)
        if type(wrapper).__name__ == "CriticalAdaKVPress" and keys.shape[0] > 1:
            raise ValueError(
                "CriticalAdaKVPress (kvpress 0.5.5) counts its head budgets over the whole batch, "
                f"which mis-sizes the heads of a batch of {keys.shape[0]}: run one prompt at a time."
            )
        state = self.layer_state(module, hidden_states, keys, values, attentions, kwargs)
        if self.method.comparable_across_heads is None:  # no scores: its own kept set
            n_kept = self.target_count(state.prompt_length)
            scores = keys.new_ones(keys.shape[:3], dtype=torch.float32)
            if n_kept is not None:
                scores.zero_()
                if n_kept:
                    indices = self.kept_indices(state, n_kept)
                    scores.scatter_(-1, indices, 1.0)
            return scores
        n_first, n_last = self.method.protected(state.prompt_length)
        return ranked_scores(self.method.score(state), n_first, n_last)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        self.refuse_wrapper()
        n_kept = self.target_count(keys.shape[2])
        if n_kept is None:
            return keys, values
        if n_kept == 0:
            return keys[:, :, :0].contiguous(), values[:, :, :0].contiguous()
        state = self.layer_state(module, hidden_states, keys, values, attentions, kwargs)
        indices = self.kept_indices(state, n_kept)
        if indices is None:
            return keys, values
        return gather_tokens(keys, indices), gather_tokens(values, indices)


def _ratio_of(press: MethodPress) -> float:
    if press.budget is not None:
        wrapper = wrapping_press(press)
        name = type(wrapper).__name__ if wrapper is not None else "a kvpress wrapper"
        raise ValueError(f"{budget_refusal(press.budget, name)}.")
    return press._ratio


def _set_ratio(press: MethodPress, value: float) -> None:
    if press.__dict__.get("budget") is not None and value:
        _ratio_of(press)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(
            f"compression_ratio must lie in [0, 1] (the fraction removed), got {value}."
        )
    press._ratio = float(value)


# The ratio is a property, so that a wrapper reading or setting the ratio of a budget press is
# refused in one line instead of compressing nothing (the dataclass field keeps its default 0).
MethodPress.compression_ratio = property(_ratio_of, _set_ratio)  # type: ignore[assignment]
