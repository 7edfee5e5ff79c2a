"""Our eviction methods as kvpress presses, for kvpress's own pipeline (``as_press``).

Imports kvpress: reach it through :func:`capkv.interop.as_press`, which says how to install
kvpress where it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvpress import ScorerPress
from torch import nn
from transformers import PreTrainedModel

from capkv.engine.budget import Budget
from capkv.engine.compression import gather_tokens
from capkv.engine.hooks import attention_layers, rotary_embedding
from capkv.engine.layer import LayerPrefill
from capkv.engine.method import EvictionMethod


@dataclass
class MethodPress(ScorerPress):
    """A kvpress press that keeps, in every layer, what our engine keeps with ``method``.

    Parameters
    ----------
    method : EvictionMethod
        CapKV or a baseline (H2O, SnapKV, PyramidKV, StreamingLLM...), with its settings.
    compression_ratio : float
        Fraction of the prompt removed (kvpress's convention, as ``ratio=`` here).
    budget : int, optional
        Tokens kept per KV head per layer instead of a ratio (our ``budget=``).

    ``compress`` keeps ``method``'s own choice: its protected tokens, its per-layer budget
    (PyramidKV's schedule), its top-k. ``score`` gives its scores with protected tokens at
    +inf, for kvpress wrappers that take a scorer (AdaKVPress, BlockPress...). Methods
    recompute the queries they need, so any attention implementation works.
    """

    method: EvictionMethod | None = None
    compression_ratio: float = 0.0
    budget: int | None = None
    num_layers: int = field(default=0, init=False, repr=False)
    rotary_emb: nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.method, EvictionMethod):
            raise ValueError(
                f"as_press needs an eviction method (CapKV, H2O, SnapKV...), got {self.method!r}."
            )
        self.method.check_budget(self.size())

    def size(self) -> Budget:
        """The budget the press keeps: ``budget`` tokens, else ``compression_ratio``."""
        if self.budget is not None:
            return Budget(tokens=self.budget)
        return Budget(ratio=self.compression_ratio)

    def post_init_from_model(self, model: PreTrainedModel) -> None:
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
        """The prefill state our methods read, from what kvpress gives a press."""
        if not self.num_layers:
            raise ValueError(
                "This press was not applied to a model: use it as `with press(model):` or "
                "through kvpress's pipeline."
            )
        cos, sin = kwargs["position_embeddings"]
        return LayerPrefill(
            module=module,
            rotary_emb=self.rotary_emb,
            num_layers=self.num_layers,
            hidden_states=hidden_states,
            keys=keys,
            values=values,
            cos=cos,
            sin=sin,
            attentions=attentions,
        )

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        state = self.layer_state(module, hidden_states, keys, values, attentions, kwargs)
        scores = self.method.score(state).float().clone()
        n_first, n_last = self.method.protected(state.prompt_length)
        scores[..., :n_first] = float("inf")
        scores[..., state.prompt_length - n_last :] = float("inf")
        return scores

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.budget is None and self.compression_ratio == 0:
            return keys, values
        state = self.layer_state(module, hidden_states, keys, values, attentions, kwargs)
        indices = self.method.kept_indices(state, self.size())
        if indices is None:
            return keys, values
        return gather_tokens(keys, indices), gather_tokens(values, indices)
