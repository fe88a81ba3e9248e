"""SigLIP2 NaFlex vision towers (``siglip2`` model_type) in Flax NNX, on the ``vit`` pieces.

Fixed-resolution SigLIP2 checkpoints are ``siglip`` model_type: ``vlmsel_jax.models.vit``.
"""

from vlmsel_jax.models.siglip2.modeling import (
    NAFLEX_POOLINGS,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    NaflexOutput,
    Siglip2Vit,
    antialiased_bilinear_weights,
    config_from_hf,
    resize_positions,
    select_naflex_features,
)
from vlmsel_jax.models.siglip2.params import key_table
from vlmsel_jax.models.siglip2.preprocessing import (
    NaflexInputs,
    NaflexPreprocessing,
    naflex_image_size,
)

__all__ = [
    "NAFLEX_POOLINGS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "NaflexInputs",
    "NaflexOutput",
    "NaflexPreprocessing",
    "Siglip2Vit",
    "antialiased_bilinear_weights",
    "config_from_hf",
    "key_table",
    "naflex_image_size",
    "resize_positions",
    "select_naflex_features",
]
