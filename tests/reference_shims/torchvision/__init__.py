"""A stand-in for torchvision, so that timm and open_clip import as test references.

torchvision's compiled operators link against CUDA builds of torch; the CPU torch the tests use
cannot load them, and importing torchvision then fails. timm and open_clip import torchvision at
module level only for data transforms, datasets and ``FrozenBatchNorm2d``, none of which the model
code the parity tests compare with runs. Every name here is a placeholder whose use raises, so a
reference that did reach torchvision fails loudly instead of computing something else.

Only ``tests/references.py`` puts this directory on ``sys.path``, only when the real torchvision
cannot be imported, and only while it imports a reference: it then takes the placeholder out of
``sys.modules`` and ``FINDER`` out of ``sys.meta_path``, so transformers still finds no torchvision.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _Unavailable:
  """Any torchvision name: attribute access gives another placeholder; calling one raises."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _Unavailable(f"{self._name}.{attr}")

  def __call__(self, *args, **kwargs):
    raise RuntimeError(f"{self._name}: torchvision is not available to the tests (see "
                       "tests/reference_shims/torchvision)")

  def __mro_entries__(self, bases):
    # ``class X(torchvision.something)`` at import time: a plain base; instantiating X is fine
    # only if X never reaches torchvision code.
    return (object,)


class _Module(types.ModuleType):

  def __getattr__(self, attr: str):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _Unavailable(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Makes every ``torchvision.<sub>`` module a placeholder module."""

  def find_spec(self, name, path, target=None):
    if name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    return _Module(spec.name)

  def exec_module(self, module):
    module.__path__ = []


FINDER = _Finder()
sys.meta_path.insert(0, FINDER)
sys.modules[__name__].__class__ = _Module
__version__ = "0.0+unavailable"
