"""The rules that turn one checkpoint tensor into one NNX parameter.

A family's ``params.py`` maps each checkpoint key to an NNX key and one of these rules; the generic
loader (``vlmsel_jax.models.loading``) applies them. Keeping the rules a small closed set means a
key table stays data, and a new checkpoint format only needs a new table.
"""

from __future__ import annotations

import enum

import numpy as np


class Transform(enum.Enum):
  """How a checkpoint tensor becomes an NNX parameter."""

  # A torch ``nn.Linear`` weight, stored (out, in); ``nnx.Linear`` keeps its kernel as (in, out).
  LINEAR = "linear"
  # A torch ``nn.Conv2d`` weight, stored (out, in, kh, kw); ``nnx.Conv`` keeps (kh, kw, in, out).
  CONV = "conv"
  # An embedding table (vocab, dim), or another learned embedding (class / register tokens, a
  # position table): the same layout in torch and NNX.
  EMBED = "embed"
  # A norm scale vector: copied as is.
  SCALE = "scale"
  # A bias vector: copied as is.
  BIAS = "bias"
  # A running statistic of a BatchNorm (mean or variance), used at inference: copied as is.
  STAT = "stat"
  # A tensor the model deliberately does not use (e.g. a saved copy of a tied weight).
  SKIP = "skip"


def apply(transform: Transform, tensor: np.ndarray) -> np.ndarray:
  """Returns ``tensor`` laid out as the NNX parameter expects it under ``transform``."""
  if transform is Transform.LINEAR:
    if tensor.ndim != 2:
      raise ValueError(f"a linear weight must be 2-D, got shape {tensor.shape}")
    return tensor.T
  if transform is Transform.CONV:
    if tensor.ndim != 4:
      raise ValueError(f"a conv weight must be 4-D, got shape {tensor.shape}")
    return tensor.transpose(2, 3, 1, 0)
  if transform in (Transform.EMBED, Transform.SCALE, Transform.BIAS, Transform.STAT):
    return tensor
  raise ValueError(f"transform {transform} produces no parameter")


# A key table: checkpoint-key regex -> (NNX key template or None for skipped keys, rule).
Table = dict[str, tuple[str | None, Transform]]


def linear_keys(prefix: str, target: str) -> Table:
  """weight and bias of one torch ``nn.Linear`` -> kernel and bias of one ``nnx.Linear``."""
  return {
      prefix + r"\.weight": (target + ".kernel", Transform.LINEAR),
      prefix + r"\.bias": (target + ".bias", Transform.BIAS),
  }


def layer_norm_keys(prefix: str, target: str) -> Table:
  """weight and bias of one torch ``nn.LayerNorm`` -> scale and bias of one ``nnx.LayerNorm``."""
  return {
      prefix + r"\.weight": (target + ".scale", Transform.SCALE),
      prefix + r"\.bias": (target + ".bias", Transform.BIAS),
  }
