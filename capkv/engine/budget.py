"""How many tokens a method keeps: a token budget per KV head, or a compression ratio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """The size of the compressed cache, in exactly one of two conventions.

    Parameters
    ----------
    tokens : int, optional
        Tokens kept per KV head per layer, protected tokens (sinks, observation window)
        included: the SnapKV / PyramidKV / KVCache-Factory convention (128, 512, 2048...).
    ratio : float, optional
        Fraction of the prompt removed, in [0, 1): kvpress's convention, which keeps
        ``int(T * (1 - ratio))`` tokens per KV head for a prompt of ``T`` tokens.

    A prompt no longer than the budget is left untouched.
    """

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError(
                "Give exactly one of budget (tokens kept per KV head) and ratio (fraction "
                f"removed); got budget={self.tokens} and ratio={self.ratio}."
            )
        if self.tokens is not None and (isinstance(self.tokens, bool) or self.tokens <= 0):
            raise ValueError(f"budget must be a positive number of tokens, got {self.tokens}.")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must lie in [0, 1) (the fraction removed), got {self.ratio}.")

    def n_kept(self, prompt_length: int) -> int:
        """Tokens kept per KV head for a prompt of ``prompt_length`` tokens (at most all)."""
        if self.tokens is not None:
            return min(self.tokens, prompt_length)
        return int(prompt_length * (1.0 - self.ratio))

    @property
    def label(self) -> str:
        """Short name used in result paths and tables, e.g. ``budget512`` or ``ratio0.5``."""
        return f"budget{self.tokens}" if self.tokens is not None else f"ratio{self.ratio:g}"


@dataclass(frozen=True)
class ByteBudget(Budget):
    """A budget given in bytes and held as tokens: ``kv_bytes`` per KV head and layer (a token
    budget) or ``kv_fraction`` of the full cache's bytes at 16 bits (a ratio), resolved for one
    storage by :func:`capkv.engine.kv_bytes.byte_budget`.

    Parameters
    ----------
    kv_bytes : int, optional
        Bytes per KV head per layer; ``tokens`` is the most tokens they hold.
    kv_fraction : float, optional
        Share of the prompt's full 16-bit cache; ``ratio`` removes what does not fit.
    """

    kv_bytes: int | None = None
    kv_fraction: float | None = None

    @property
    def label(self) -> str:
        """``kvbytes8192`` or ``kvfrac0.25``: the same folder name for every storage."""
        if self.kv_bytes is not None:
            return f"kvbytes{self.kv_bytes}"
        return f"kvfrac{self.kv_fraction:g}"
