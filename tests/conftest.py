"""Shared fixtures: tiny randomly initialised models and a helper to capture prefill states."""

from __future__ import annotations

import os

import pytest

# Triton kernels run on the CPU (tests/engine/test_h2o_kernel.py). Triton reads this when it is first
# imported (transformers may import it through torch), so it is set before anything else.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import DynamicCache, PreTrainedTokenizerFast  # noqa: E402

from capkv.engine.compression import prefill_state  # noqa: E402
from capkv.engine.hooks import attention_layers, forward_hooks, rotary_embedding, run_with_cache  # noqa: E402
from capkv.engine.layer import LayerPrefill  # noqa: E402
from capkv.models import build_tiny_model  # noqa: E402
from capkv.tasks.haystack import essay_files  # noqa: E402


@pytest.fixture(scope="session")
def gqa_model():
    """Tiny Llama with 4 query heads sharing 2 KV heads (GQA), sdpa attention."""
    return build_tiny_model(seed=0, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def mha_model():
    """Tiny Llama with plain multi-head attention (4 query and 4 KV heads)."""
    return build_tiny_model(seed=1, num_attention_heads=4, num_key_value_heads=4)


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=generator)


@torch.no_grad()
def capture_prefill(model, input_ids: torch.Tensor) -> list[LayerPrefill]:
    """Run a plain prefill and return every layer's prefill state (nothing is evicted)."""
    layers = attention_layers(model)
    states: list[LayerPrefill] = []

    def keep_state(module, args, kwargs, output):
        states.append(prefill_state(module, args, kwargs, rotary_embedding(model), len(layers)))
        return output

    with forward_hooks(layers, post=keep_state):
        run_with_cache(model, input_ids, DynamicCache())
    return states


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` in a fraction of a second (no download)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="session")
def essay_tokenizer() -> PreTrainedTokenizerFast:
    """A 2000-token BPE of the Paul Graham essays, for the needle and RULER tasks."""
    return train_bpe_tokenizer([path.read_text() for path in essay_files()], vocab_size=2000)


def require_kvpress(reason: str | None, extra: str = "kvpress") -> None:
    """Skip the calling test module where kvpress cannot run (``reason`` says why), or fail where
    ``make test`` requires it (``CAPKV_REQUIRE_KVPRESS=1``, in .venv-oracle); nothing if it can."""
    if reason is None:
        return
    reason += f": make test runs these tests in .venv-oracle (or pip install -e '.[{extra}]')"
    if os.environ.get("CAPKV_REQUIRE_KVPRESS") == "1":  # set by make test: fail, never skip
        raise RuntimeError(f"CAPKV_REQUIRE_KVPRESS=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)
