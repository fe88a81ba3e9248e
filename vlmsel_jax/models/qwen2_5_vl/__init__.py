"""The vision tower of Qwen2.5-VL in Flax NNX."""

from vlmsel_jax.models.qwen2_5_vl.modeling import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    Qwen25VisionConfig,
    Qwen25VisionOutput,
    Qwen25VisionTower,
    select_features,
)
from vlmsel_jax.models.qwen2_5_vl.params import key_table, reads_key

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Qwen25VisionConfig",
    "Qwen25VisionOutput",
    "Qwen25VisionTower",
    "key_table",
    "reads_key",
    "select_features",
]
