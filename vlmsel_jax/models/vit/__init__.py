"""Vision transformers (CLIP, SigLIP, DINOv2, ViT vision towers) in Flax NNX."""

from vlmsel_jax.models.vit.modeling import (
    ACTIVATIONS,
    POOLINGS,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    VARIANTS,
    Vit,
    VitConfig,
    VitOutput,
    bicubic_resize_weights,
    resize_grid,
    select_features,
)
from vlmsel_jax.models.vit.params import key_table

__all__ = [
    "ACTIVATIONS",
    "POOLINGS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "VARIANTS",
    "Vit",
    "VitConfig",
    "VitOutput",
    "bicubic_resize_weights",
    "key_table",
    "resize_grid",
    "select_features",
]
