"""Test references that import torchvision (timm, open_clip), importable with the CPU torch.

``import_reference("timm")`` imports the package; when the real torchvision cannot be imported
(it is not installed in the test environment: its compiled operators need a CUDA torch), the
placeholder in ``reference_shims/`` stands in for it first. The models the tests compare with never
call torchvision; the placeholder raises if one does.
"""

from __future__ import annotations

import importlib
import os
import sys

_SHIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_shims")


def _ensure_torchvision() -> None:
  if "torchvision" in sys.modules:
    return
  try:
    importlib.import_module("torchvision")
  except Exception:  # pylint: disable=broad-except  # ImportError, or its operators failing
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    sys.path.insert(0, _SHIMS)
    try:
      importlib.import_module("torchvision")
    finally:
      sys.path.remove(_SHIMS)


def import_reference(name: str):
  """Imports ``timm`` or ``open_clip`` (or any module that needs torchvision only at import)."""
  _ensure_torchvision()
  return importlib.import_module(name)
