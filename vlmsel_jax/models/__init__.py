"""JAX/Flax NNX ports of pretrained LLMs and vision encoders, and their checkpoint loader.

One sub-package per model family (``modeling.py``: config + modules; ``params.py``: checkpoint
key table); ``attention`` is what they share: how attention is computed (the CPU-tuned einsum
or ``jax.nn.dot_product_attention``) and whether layers are rematerialized. Loading a checkpoint
goes down three floors, each importing only those below it:

* ``checkpoint``: the errors, the key-table type and ``assign_tensors``, which fills a model from
  (key, array) pairs through a key table;
* the sources of such pairs: ``pth`` (PyTorch ``.pth`` / ``pytorch_model.bin``, read without
  torch) and ``gguf`` (llama.cpp files, with their config and tokenizer);
* ``loading``: the family registry, ``HFDirectory`` (Hugging Face directories) and the
  ``load_*`` functions that pair a source with its family.

The loader's names are handed on from here on first use, so that importing one family
(``vlmsel_jax.models.vit``) imports neither the loader nor gguf's transformers and tokenizers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "CheckpointFileError",
    "Family",
    "GGUFFile",
    "HFDirectory",
    "KeyTable",
    "TorchStateDict",
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


def __getattr__(name: str) -> Any:
  """The loader's names in ``__all__``, imported when one is first asked for (PEP 562)."""
  if name not in __all__:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.models import checkpoint, gguf, loading, pth
  return next(getattr(module, name) for module in (checkpoint, pth, gguf, loading)
              if name in module.__all__)
