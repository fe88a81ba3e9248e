"""Vision towers without pretrained weights: raw pixel patches and HOG (NNX)."""

from vlmsel_jax.models.handcrafted.modeling import (
    BLOCK_NORMS,
    POOLINGS,
    TOWERS,
    HandcraftedOutput,
    Hog,
    HogConfig,
    PixelPatches,
    PixelPatchesConfig,
    cell_histograms,
    normalize_blocks,
    select_features,
)

__all__ = [
    "BLOCK_NORMS",
    "POOLINGS",
    "TOWERS",
    "HandcraftedOutput",
    "Hog",
    "HogConfig",
    "PixelPatches",
    "PixelPatchesConfig",
    "cell_histograms",
    "normalize_blocks",
    "select_features",
]
