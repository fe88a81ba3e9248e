"""PyTorch ``.pth`` / ``.pt`` state dicts as a source of (key, numpy array) pairs.

Many vision checkpoints outside the Hugging Face hub ship as a pickled ``state_dict``; this module
feeds one to the generic loader. The file is read by ``pth``, a restricted unpickler that needs
no torch and runs no code from the file (only tensors and containers are read), as
``torch.load(weights_only=True)`` would read it.

Typical use::

  model = load_torch_checkpoint("efficientnet-lite0.pth",
                                {"model_type": "efficientnet_lite", "variant": "lite0"})
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from flax import nnx

from vlmsel_jax.models.loading import load_model
# The reader lives in pth, which imports nothing of vlmsel_jax, so that loading can use it too.
from vlmsel_jax.models.pth import read_torch_state_dict

__all__ = ["TorchStateDict", "load_torch_checkpoint", "read_torch_state_dict"]


class TorchStateDict:
  """A PyTorch state dict file as a source of (key, numpy array) pairs.

  Iterating reads the file (again, each time) and yields every tensor, one array at a time.

  Attributes:
    path: The ``.pth`` / ``.pt`` file.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    yield from read_torch_state_dict(self.path)

  def __str__(self) -> str:
    return str(self.path)


def load_torch_checkpoint(path: str | os.PathLike, config: Mapping[str, Any], *,
                          dtype: Any = "float32") -> nnx.Module:
  """Loads a PyTorch state dict file as the NNX model ``config`` describes.

  Args:
    path: The ``.pth`` / ``.pt`` file.
    config: The config dict of the model (its ``model_type`` picks the family), e.g.
      ``{"model_type": "efficientnet_lite", "variant": "lite0"}``.
    dtype: "float32" or "bfloat16".

  Raises:
    CheckpointFileError: the file is missing, truncated, corrupt or holds more than tensors and
      containers (the message names it).
    UnsupportedModelError: no family implements the config.
    CheckpointError: the tensors do not fit the model (every problem listed).
  """
  source = TorchStateDict(path)
  return load_model(config, source, dtype=dtype, source=str(source))
