"""OpenCLIP model directories (a Hub repo's layout) as checkpoint sources of ConvNeXt towers.

``push_to_hf_hub`` writes ``open_clip_config.json`` (``model_cfg``: the model's architecture;
``preprocess_cfg``: its image preprocessing) next to the weights of the whole CLIP model,
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``. ``OpenClipDirectory`` reads
the config, turns a timm ConvNeXt vision tower into a ``ConvNextConfig`` and yields every tensor;
the key table keeps ``visual.*`` and skips the text tower by name.

Typical use::

  src = OpenClipDirectory("CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup")
  model = loading.load_model(src.config, src, source=str(src))
  src.preprocess_cfg  # {"mean": [...], "std": [...], "interpolation": "bicubic", ...}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vlmsel_jax.models.checkpoint import CheckpointFileError, UnsupportedModelError
from vlmsel_jax.models.convnext.modeling import ConvNextConfig
from vlmsel_jax.models.loading import read_safetensors
from vlmsel_jax.models.pth import read_torch_state_dict

CONFIG_FILE = "open_clip_config.json"
# The weight files OpenCLIP's hub loader prefers, in its order (factory._find_checkpoint_in_dir).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin")


def is_open_clip_dir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a directory with an ``open_clip_config.json``."""
  return (Path(path) / CONFIG_FILE).is_file()


def _read_config(path: Path) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointFileError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
    raise CheckpointFileError(f"{path}: not an OpenCLIP config (no 'model_cfg' object)")
  return data


class OpenClipDirectory:
  """An OpenCLIP model directory with a ConvNeXt vision tower, as (key, numpy array) pairs.

  Attributes:
    path: The directory.
    model_cfg: ``open_clip_config.json``'s ``model_cfg``.
    preprocess_cfg: Its ``preprocess_cfg`` ({} when absent: OpenCLIP's defaults apply).
    convnext: The tower's ``ConvNextConfig``.
    file: The weight file read (the first of ``WEIGHT_FILES`` present).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    config_file = self.path / CONFIG_FILE
    if not config_file.is_file():
      raise CheckpointFileError(f"{config_file}: no such file")
    data = _read_config(config_file)
    self.model_cfg = data["model_cfg"]
    self.preprocess_cfg = dict(data.get("preprocess_cfg") or {})
    try:
      self.convnext = ConvNextConfig.from_open_clip(self.model_cfg, str(config_file))
    except (ValueError, KeyError, TypeError) as e:
      message = str(e) if str(e).startswith(str(config_file)) else f"{config_file}: {e!r}"
      raise UnsupportedModelError(message) from None
    present = [self.path / name for name in WEIGHT_FILES if (self.path / name).is_file()]
    if not present:
      raise CheckpointFileError(f"{self.path / WEIGHT_FILES[0]}: no such file (nor "
                                f"{', '.join(WEIGHT_FILES[1:])})")
    self.file = present[0]

  @property
  def config(self) -> dict[str, Any]:
    """The config dict ``loading.load_model`` builds the tower from."""
    return self.convnext.to_dict()

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    if self.file.suffix == ".safetensors":
      yield from read_safetensors(self.file)
    else:
      yield from read_torch_state_dict(self.file)

  def __str__(self) -> str:
    return str(self.path)
