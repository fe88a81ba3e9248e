"""Model zoo: JAX/Flax NNX ports of pretrained LLMs and vision encoders, and their loader.

One sub-package per model family (``modeling.py``: config + modules; ``params.py``: checkpoint
key table); ``loading`` turns any (key, array) source into an NNX model through those tables;
``gguf`` is the source for llama.cpp GGUF files, ``torch_source`` for PyTorch ``.pth`` state
dicts.
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
from vlmsel_jax.models.torch_source import (
    TorchStateDict,
    load_torch_checkpoint,
    read_torch_state_dict,
)
from vlmsel_jax.models.transforms import Transform

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "CheckpointFileError",
    "Family",
    "GGUFFile",
    "HFDirectory",
    "TorchStateDict",
    "Transform",
    "UnsupportedModelError",
    "assign_tensors",
    "family_for",
    "load_gguf",
    "load_model",
    "load_pretrained",
    "load_torch_checkpoint",
    "read_safetensors",
    "read_torch_state_dict",
    "supported_architectures",
    "supported_model_types",
]
