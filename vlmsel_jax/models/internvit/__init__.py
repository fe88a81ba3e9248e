"""InternViT, the vision tower of transformers' InternVL, in Flax NNX."""

from vlmsel_jax.models.internvit.modeling import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    InternVit,
    InternVitConfig,
)
from vlmsel_jax.models.internvit.params import key_table, reads_key

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "InternVit",
    "InternVitConfig",
    "key_table",
    "reads_key",
]
