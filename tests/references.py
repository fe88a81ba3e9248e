"""Test references that import torchvision (timm, open_clip), importable with the CPU torch.

``import_reference("timm")`` imports the package. When the real torchvision cannot be imported (it
is not installed in the test environment: its compiled operators need a CUDA torch), the
placeholder in ``reference_shims/`` stands in for it while the package imports, and is removed
again afterwards: the package keeps the placeholder names it bound, and other libraries
(transformers checks ``importlib.util.find_spec("torchvision")``) still see no torchvision. The
models the tests compare with never call torchvision; a placeholder raises if one does.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

_SHIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_shims")


def _torchvision_modules() -> list[str]:
  return [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]


def _real_torchvision() -> bool:
  try:
    importlib.import_module("torchvision")
    return True
  except Exception:  # pylint: disable=broad-except  # ImportError, or its operators failing
    for name in _torchvision_modules():
      del sys.modules[name]
    return False


@contextlib.contextmanager
def _placeholder_torchvision():
  # transformers decides once per process (an lru_cache) whether torchvision is there, and
  # open_clip imports transformers: let it decide before the placeholder exists.
  with contextlib.suppress(ImportError):
    importlib.import_module("transformers.utils.import_utils").is_torchvision_available()
  sys.path.insert(0, _SHIMS)
  try:
    shim = importlib.import_module("torchvision")
  finally:
    sys.path.remove(_SHIMS)
  try:
    yield
  finally:
    sys.meta_path[:] = [f for f in sys.meta_path if f is not shim.FINDER]
    for name in _torchvision_modules():
      del sys.modules[name]


def import_reference(name: str):
  """Imports ``timm`` or ``open_clip`` (or any module that needs torchvision only at import)."""
  if name in sys.modules or _real_torchvision():
    return importlib.import_module(name)
  with _placeholder_torchvision():
    return importlib.import_module(name)
