"""Gemma 3's text decoder (Gemma3ForCausalLM) in Flax NNX."""

from vlmsel_jax.models.gemma3.modeling import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    Gemma3,
    Gemma3Config,
    Gemma3Output,
)
from vlmsel_jax.models.gemma3.params import key_table

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Gemma3",
    "Gemma3Config",
    "Gemma3Output",
    "key_table",
]
