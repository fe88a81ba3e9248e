"""LLaVA-style vision-language model: frozen vision tower → projector → LLM."""

from vlmsel_jax.models.vlm.modeling import (
    IMAGE_TOKENS,
    PROJECTORS,
    VLM,
    Projector,
    VLMConfig,
    image_features,
    splice_image_tokens,
    tower_grid,
)

__all__ = [
    "IMAGE_TOKENS",
    "PROJECTORS",
    "VLM",
    "Projector",
    "VLMConfig",
    "image_features",
    "splice_image_tokens",
    "tower_grid",
]
