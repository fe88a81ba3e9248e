"""Gemma 1 (GemmaForCausalLM) and Gemma 2 (Gemma2ForCausalLM) decoders in Flax NNX."""

from vlmsel_jax.models.gemma.modeling import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    Gemma,
    GemmaConfig,
    GemmaOutput,
)
from vlmsel_jax.models.gemma.params import key_table

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Gemma",
    "GemmaConfig",
    "GemmaOutput",
    "key_table",
]
