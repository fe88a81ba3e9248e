"""Llama-family decoder LMs (Llama, SmolLM2, Qwen2, Mistral) in Flax NNX."""

from vlmsel_jax.models.llama.modeling import (
    SUPPORTED_MODEL_TYPES,
    Llama,
    Llama3RopeScaling,
    LlamaConfig,
    LlamaOutput,
)
from vlmsel_jax.models.llama.params import key_table

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Llama",
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaOutput",
    "key_table",
]
