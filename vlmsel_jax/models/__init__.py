"""Model zoo: JAX/Flax NNX ports of pretrained LLMs and vision encoders, and their loader.

One sub-package per model family (``modeling.py``: config + modules; ``params.py``: checkpoint
key table); ``loading`` turns any (key, array) source into an NNX model through those tables.
"""

from vlmsel_jax.models.loading import (
    FAMILIES,
    CheckpointError,
    CheckpointFileError,
    Family,
    HFDirectory,
    UnsupportedModelError,
    assign_tensors,
    family_for,
    load_model,
    load_pretrained,
    read_safetensors,
    supported_architectures,
    supported_model_types,
)
from vlmsel_jax.models.transforms import Transform

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "CheckpointFileError",
    "Family",
    "HFDirectory",
    "Transform",
    "UnsupportedModelError",
    "assign_tensors",
    "family_for",
    "load_model",
    "load_pretrained",
    "read_safetensors",
    "supported_architectures",
    "supported_model_types",
]
