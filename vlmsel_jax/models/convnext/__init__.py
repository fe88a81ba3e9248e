"""ConvNeXt image encoders (transformers' ConvNextModel, OpenCLIP's ConvNeXt CLIP towers) in Flax
NNX, and their two checkpoint key tables."""

from vlmsel_jax.models.convnext.modeling import (
    ACTIVATIONS,
    OPEN_CLIP_ARCHITECTURE,
    POOLINGS,
    PROJECTIONS,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    TIMM_CONVNEXTS,
    WEIGHTS_FORMATS,
    ConvNext,
    ConvNextConfig,
    ConvNextOutput,
    TimmConvNext,
    select_features,
)
from vlmsel_jax.models.convnext.params import key_table

__all__ = [
    "ACTIVATIONS",
    "OPEN_CLIP_ARCHITECTURE",
    "POOLINGS",
    "PROJECTIONS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "TIMM_CONVNEXTS",
    "WEIGHTS_FORMATS",
    "ConvNext",
    "ConvNextConfig",
    "ConvNextOutput",
    "TimmConvNext",
    "key_table",
    "select_features",
]
