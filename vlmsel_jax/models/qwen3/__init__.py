"""Qwen3's decoder (Qwen3ForCausalLM) in Flax NNX."""

from vlmsel_jax.models.qwen3.modeling import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    Qwen3,
    Qwen3Config,
    Qwen3Output,
)
from vlmsel_jax.models.qwen3.params import key_table

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Qwen3",
    "Qwen3Config",
    "Qwen3Output",
    "key_table",
]
