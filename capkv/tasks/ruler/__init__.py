"""RULER's synthetic tasks, generated here for the model's own tokenizer.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654, github.com/NVIDIA/RULER) extends the needle test to retrieval with
distractors and several answers (NIAH single, multi-key, multi-value, multi-query), multi-hop
tracing (variable tracking) and aggregation (common and frequent words extraction). Prompts follow
RULER's templates (``scripts/data/synthetic/constants.py``); the part after the context is the
question and RULER's answer prefix opens the assistant turn. Every task is scored as RULER scores
it, with ``string_match_all``: the fraction of the references contained in the prediction, case
insensitive (RULER keeps ``string_match_part`` for its QA tasks, which are not generated here).

One module per family (:mod:`~capkv.tasks.ruler.niah`, :mod:`~capkv.tasks.ruler.variable_tracking`,
:mod:`~capkv.tasks.ruler.common_words`, :mod:`~capkv.tasks.ruler.frequent_words`) on the shared
machinery of :mod:`~capkv.tasks.ruler.base`; the variants are configurations
(``conf/task/ruler/<subtask>.yaml``), run together by :class:`RulerSuite` (``task=ruler``).
"""

from capkv.tasks.ruler.base import RulerTask, string_match_all
from capkv.tasks.ruler.common_words import CommonWordsTask
from capkv.tasks.ruler.frequent_words import FrequentWordsTask
from capkv.tasks.ruler.niah import NiahTask
from capkv.tasks.ruler.suite import SUBTASKS, RulerSuite, ruler_variant, variants
from capkv.tasks.ruler.variable_tracking import VariableTrackingTask

__all__ = [
    "SUBTASKS",
    "CommonWordsTask",
    "FrequentWordsTask",
    "NiahTask",
    "RulerSuite",
    "RulerTask",
    "VariableTrackingTask",
    "ruler_variant",
    "string_match_all",
    "variants",
]
