"""kvpress and this harness, both ways.

- ``method=kvpress method.press=TOVAPress`` (:class:`KvpressMethod`): every kvpress scorer
  press as an eviction method here, in single runs and sweeps (``methods=[kvpress-tova]``).
- :func:`as_press`: our methods as kvpress presses, for kvpress's own pipeline.

kvpress is an optional extra (``pip install -e '.[kvpress]'``); kvpress 0.5.5 needs
transformers below 5.3.
"""

from __future__ import annotations

from typing import Any

from capkv.engine.method import EvictionMethod
from capkv.interop.environment import import_kvpress, kvpress_problem
from capkv.interop.scorers import SUPPORTED_PRESSES, KvpressMethod, press_class_name, short_name


def as_press(
    method: EvictionMethod, compression_ratio: float = 0.0, budget: int | None = None
) -> Any:
    """``method`` as a kvpress press (a ``ScorerPress``) keeping exactly what our engine keeps.

    Under kvpress's wrappers (AdaKVPress, DecodingPress, ComposedPress...) it keeps what the
    wrapper keeps around kvpress's own presses, or refuses in one line when applied; which
    wrapper works with which method, and why the others are refused: ``docs/kvpress.md``.

    Parameters
    ----------
    method : EvictionMethod
        e.g. ``CapKV()``, ``H2O()``, ``SnapKV(pooling="max")``, ``PyramidKV()``.
    compression_ratio : float
        Fraction of the prompt removed, as kvpress's presses take it.
    budget : int, optional
        Tokens kept per KV head per layer instead (``compression_ratio`` is then ignored); such
        a press runs alone (or as PrefillDecodingPress's prefilling press), since the other
        wrappers work with ratios.

    Examples
    --------
    >>> press = as_press(CapKV(), compression_ratio=0.5)
    >>> pipe(context, question=question, press=press)   # kvpress's KVPressTextGenerationPipeline
    """
    import_kvpress("capkv.interop.as_press")
    from capkv.interop.press import MethodPress

    return MethodPress(method=method, compression_ratio=compression_ratio, budget=budget)


__all__ = [
    "SUPPORTED_PRESSES",
    "KvpressMethod",
    "as_press",
    "kvpress_problem",
    "press_class_name",
    "short_name",
]
