"""EfficientNet-Lite (lite0 .. lite4) image classifiers in Flax NNX, their ``.pth`` key table and
TensorFlow's eval preprocessing (the pretrained weights are the zoo's: ``zoo.packages``)."""

from vlmsel_jax.models.efficientnet.modeling import (
    BASE_STAGES,
    DEPTHWISE_IMPLS,
    POOLINGS,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    VARIANTS,
    DepthwiseConv,
    EfficientNetConfig,
    EfficientNetLite,
    EfficientNetOutput,
    PreprocessInfo,
    StageSpec,
    preprocess,
    preprocess_info,
    round_filters,
    round_repeats,
    select_features,
)
from vlmsel_jax.models.efficientnet.params import key_table

__all__ = [
    "BASE_STAGES",
    "DEPTHWISE_IMPLS",
    "POOLINGS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "VARIANTS",
    "DepthwiseConv",
    "EfficientNetConfig",
    "EfficientNetLite",
    "EfficientNetOutput",
    "PreprocessInfo",
    "StageSpec",
    "key_table",
    "preprocess",
    "preprocess_info",
    "round_filters",
    "round_repeats",
    "select_features",
]
