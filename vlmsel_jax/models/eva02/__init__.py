"""EVA-02 vision towers (timm's ``eva02_*``) in Flax NNX."""

from vlmsel_jax.models.eva02.modeling import (
    ARCHITECTURES,
    Eva02,
    Eva02Config,
    apply_rope,
    architecture_name,
    is_eva02,
    rope_table,
)
from vlmsel_jax.models.eva02.params import key_table

__all__ = [
    "ARCHITECTURES",
    "Eva02",
    "Eva02Config",
    "apply_rope",
    "architecture_name",
    "is_eva02",
    "key_table",
    "rope_table",
]
