"""Model zoo: JAX/Flax NNX ports of pretrained LLMs and vision encoders, and their loader.

One sub-package per model family (``modeling.py``: config + modules; ``params.py``: checkpoint
key table); ``loading`` turns any (key, array) source into an NNX model through those tables;
``gguf`` is the source for llama.cpp GGUF files.
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
from vlmsel_jax.models.gguf import GGUFFile, load_gguf
from vlmsel_jax.models.transforms import Transform

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "CheckpointFileError",
    "Family",
    "GGUFFile",
    "HFDirectory",
    "Transform",
    "UnsupportedModelError",
    "assign_tensors",
    "family_for",
    "load_gguf",
    "load_model",
    "load_pretrained",
    "read_safetensors",
    "supported_architectures",
    "supported_model_types",
]
