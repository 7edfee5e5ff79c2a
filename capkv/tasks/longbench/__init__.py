"""LongBench, the 16 English and code datasets (Bai et al. 2023, arXiv 2308.14508).

Prompts, generation lengths, the chat-template rule, middle truncation and scoring follow the
official THUDM/LongBench code (``config/dataset2prompt.json``, ``config/dataset2maxlen.json``,
``pred.py``, ``eval.py``). The package holds all of it:

- ``datasets.json`` and :mod:`~capkv.tasks.longbench.settings`: each dataset's template,
  generation length, chat-template rule, metric, first-line rule, family and LongBench-E
  membership, and LongBench-E's length buckets;
- :mod:`~capkv.tasks.longbench.prompts`: filling, middle truncation and splitting of prompts;
- :mod:`~capkv.tasks.longbench.data`: records from JSONL files, checked;
- :mod:`~capkv.tasks.longbench.hub`: the official ``data.zip`` from the hub, unpacked once into
  the cache (``python -m capkv.tasks.longbench`` prepares it);
- :mod:`~capkv.tasks.longbench.metrics`: the six metrics;
- :mod:`~capkv.tasks.longbench.buckets`: LongBench-E's scores per length bucket;
- :mod:`~capkv.tasks.longbench.task`: :class:`LongBench` (``task=longbench``,
  ``task=longbench_e``) and :class:`CustomJsonlTask` (``task=custom``).

docs/longbench.md tells how to run them and where we depart from the official code.
"""

from capkv.tasks.longbench.data import check_jsonl, check_record, read_jsonl
from capkv.tasks.longbench.prompts import (
    PROMPT_FORMATS,
    PromptFormat,
    build_example,
    truncate_middle,
)
from capkv.tasks.longbench.settings import (
    DATASETS,
    E_DATASETS,
    FAMILIES,
    MAX_NEW_TOKENS,
    PROMPT_TEMPLATES,
)
from capkv.tasks.longbench.task import CustomJsonlTask, LongBench

__all__ = [
    "DATASETS",
    "E_DATASETS",
    "FAMILIES",
    "MAX_NEW_TOKENS",
    "PROMPT_FORMATS",
    "PROMPT_TEMPLATES",
    "CustomJsonlTask",
    "LongBench",
    "PromptFormat",
    "build_example",
    "check_jsonl",
    "check_record",
    "read_jsonl",
    "truncate_middle",
]
