"""Phi-3's decoder (Phi3ForCausalLM) in Flax NNX."""

from vlmsel_jax.models.phi3.modeling import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    LongRopeScaling,
    Phi3,
    Phi3Config,
    Phi3Output,
)
from vlmsel_jax.models.phi3.params import key_table

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "LongRopeScaling",
    "Phi3",
    "Phi3Config",
    "Phi3Output",
    "key_table",
]
