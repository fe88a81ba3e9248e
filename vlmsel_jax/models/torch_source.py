"""PyTorch ``.pth`` / ``.pt`` state dicts as a source of (key, numpy array) pairs.

Many vision checkpoints outside the Hugging Face hub ship as a pickled ``state_dict``; this module
reads one with ``torch.load(weights_only=True)`` (no arbitrary code runs) and feeds it to the
generic loader. torch is only a test dependency of vlmsel_jax, so it is imported when a file is
read, not when this module is.

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

from vlmsel_jax.models.loading import CheckpointFileError, load_model

# Keys a checkpoint may wrap its state dict in: Lightning and many training scripts save
# {"state_dict": ..., "epoch": ...} or {"model": ..., "optimizer": ...}.
_WRAPPER_KEYS = ("state_dict", "model")

# BatchNorm's training-step counter: only drives the momentum schedule when training.
_SKIPPED_SUFFIX = "num_batches_tracked"


def _import_torch() -> Any:
  """Returns the torch module, or raises an ImportError that says how to get it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading .pth needs torch: pip install torch==2.13.0") from None
  return torch


def _unwrap(obj: Any, path: Path, torch: Any) -> Mapping[str, Any]:
  """Returns the state dict inside what ``torch.load`` returned."""
  if not isinstance(obj, Mapping):
    raise CheckpointFileError(f"{path}: expected a state dict, got {type(obj).__name__}")
  has_tensors = any(isinstance(v, torch.Tensor) for v in obj.values())
  if not has_tensors:
    for key in _WRAPPER_KEYS:
      if isinstance(obj.get(key), Mapping):
        return obj[key]
  return obj


def _to_numpy(tensor: Any, torch: Any) -> np.ndarray:
  """A CPU numpy copy of a tensor; bfloat16 (which numpy lacks) becomes float32, losslessly."""
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  return tensor.numpy()


def read_torch_state_dict(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (key, array) for every tensor of a PyTorch state dict file.

  The file is read with ``torch.load(map_location="cpu", weights_only=True)``. A dict that holds
  no tensors but a ``state_dict`` or ``model`` dict is unwrapped. BatchNorm
  ``num_batches_tracked`` counters are skipped: inference does not use them.

  Raises:
    ImportError: torch is not installed.
    CheckpointFileError: the file is missing, truncated, corrupt, not a state dict, or holds a
      value that is not a tensor.
  """
  path = Path(path)
  torch = _import_torch()
  if not path.is_file():
    raise CheckpointFileError(f"{path}: no such checkpoint file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # torch.load raises RuntimeError, UnpicklingError, EOFError, ... depending on where the
    # damage is; all mean the same to a caller. Its messages can run to many lines: keep one.
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointFileError(
        f"{path}: unreadable PyTorch checkpoint, truncated or corrupt ({detail})") from None
  state = _unwrap(obj, path, torch)
  for key, value in state.items():
    if str(key).endswith(_SKIPPED_SUFFIX):
      continue
    if not isinstance(value, torch.Tensor):
      raise CheckpointFileError(
          f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor")
    yield str(key), _to_numpy(value, torch)


class TorchStateDict:
  """A PyTorch state dict file as a source of (key, numpy array) pairs.

  Iterating reads the file (again, each time) and yields every tensor.

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
    ImportError: torch is not installed.
    CheckpointFileError: the file is missing, truncated or corrupt (the message names it).
    UnsupportedModelError: no family implements the config.
    CheckpointError: the tensors do not fit the model (every problem listed).
  """
  source = TorchStateDict(path)
  return load_model(config, source, dtype=dtype, source=str(source))
