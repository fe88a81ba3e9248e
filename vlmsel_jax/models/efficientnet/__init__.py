"""EfficientNet-Lite (lite0 .. lite4) image classifiers in Flax NNX, and their torch weights."""

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
from vlmsel_jax.models.efficientnet.pretrained import WEIGHTS_PACKAGES, load_lite, weights_file

__all__ = [
    "BASE_STAGES",
    "DEPTHWISE_IMPLS",
    "POOLINGS",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "VARIANTS",
    "WEIGHTS_PACKAGES",
    "DepthwiseConv",
    "EfficientNetConfig",
    "EfficientNetLite",
    "EfficientNetOutput",
    "PreprocessInfo",
    "StageSpec",
    "key_table",
    "load_lite",
    "preprocess",
    "preprocess_info",
    "round_filters",
    "round_repeats",
    "select_features",
    "weights_file",
]
