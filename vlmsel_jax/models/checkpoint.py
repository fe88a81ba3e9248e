"""What every checkpoint source and every model family share: the errors, the key table, and
filling a model's parameters from (key, tensor) pairs.

A *source* is any iterable of ``(checkpoint key, numpy array)`` pairs: ``loading.HFDirectory``
(safetensors or ``pytorch_model.bin``), ``pth.TorchStateDict`` (``.pth``), ``gguf.GGUFFile``. A
family's *key table* maps each checkpoint-key regex to (NNX key template, ``Transform``).
``assign_tensors`` routes every tensor of a source through a table into an abstract
(``nnx.eval_shape``) model, collects *every* problem (unexpected key, missing parameter, duplicate,
shape mismatch) and raises once with the full list.

This module knows no source and no family: the sources raise its errors, and ``loading`` pairs a
source with the family its config names.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.models.transforms import Transform, apply

__all__ = [
    "CheckpointError",
    "CheckpointFileError",
    "KeyTable",
    "UnsupportedModelError",
    "assign_tensors",
]

# checkpoint-key regex -> (NNX key template, or None for a skipped key; the rule for the tensor).
KeyTable = Mapping[str, tuple[str | None, Transform]]


class CheckpointError(ValueError):
  """A checkpoint whose tensors do not fit the model; the message lists every problem."""

  def __init__(self, source: str, problems: list[str]):
    self.problems = list(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"{source}: {len(self.problems)} problem(s) loading the checkpoint:\n{lines}")


class CheckpointFileError(ValueError):
  """A checkpoint file that is missing, truncated or corrupt; the message names the file."""


class UnsupportedModelError(ValueError):
  """A config whose ``model_type`` / ``architectures`` no family here implements."""


def _flatten(tree: Mapping[Any, Any], prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
  """Flattens a nested dict to {key path: leaf}."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def _set_path(tree: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
  """Sets ``tree[path[0]][path[1]]... = value``."""
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _dotted(path: tuple[Any, ...]) -> str:
  return ".".join(str(p) for p in path)


def _route(table: KeyTable, key: str) -> tuple[str | None, Transform] | None:
  """Returns (NNX key, transform) for a checkpoint key, or None when no table entry matches."""
  for pattern, (template, transform) in table.items():
    m = re.fullmatch(pattern, key)
    if m:
      return (m.expand(template) if template is not None else None), transform
  return None


def assign_tensors(model: nnx.Module, table: KeyTable, tensors: Iterable[tuple[str, np.ndarray]],
                   *, source: str = "checkpoint") -> nnx.Module:
  """Fills an abstract (``nnx.eval_shape``) model from (key, array) pairs through ``table``.

  Every parameter of ``model`` must receive exactly one tensor of the right shape; tensors are
  cast to the parameter's dtype.

  Raises:
    CheckpointError: listing every unexpected key, missing parameter, duplicate and shape
      mismatch at once.
  """
  graphdef, abstract = nnx.split(model)
  state = nnx.to_pure_dict(abstract)
  wanted = _flatten(state)
  claimed: set[tuple[Any, ...]] = set()
  problems = []
  for key, tensor in tensors:
    routed = _route(table, key)
    if routed is None:
      problems.append(f"unexpected key {key!r} {tuple(tensor.shape)}: not in the key table")
      continue
    target, transform = routed
    if transform is Transform.SKIP:
      continue
    path = tuple(int(p) if p.isdigit() else p for p in target.split("."))
    if path not in wanted:
      problems.append(f"unexpected key {key!r} {tuple(tensor.shape)}: maps to {target}, "
                      "which this model config does not have")
      continue
    if path in claimed:
      problems.append(f"duplicate key {key!r}: {target} was already given a tensor")
      continue
    # Claimed even if the tensor turns out unusable, so a bad tensor is one problem, not two.
    claimed.add(path)
    try:
      value = apply(transform, np.asarray(tensor))
    except ValueError as e:
      problems.append(f"bad tensor {key!r} {tuple(tensor.shape)}: {e}")
      continue
    expected = wanted[path]
    if value.shape != expected.shape:
      problems.append(f"shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)} gives "
                      f"{target} {tuple(value.shape)}, the model needs {tuple(expected.shape)}")
      continue
    _set_path(state, path, jnp.asarray(value, dtype=expected.dtype))
  for path, expected in wanted.items():
    if path not in claimed:
      problems.append(f"missing parameter {_dotted(path)} {tuple(expected.shape)}: "
                      "no checkpoint key maps to it")
  if problems:
    raise CheckpointError(source, problems)
  return nnx.merge(graphdef, state)
