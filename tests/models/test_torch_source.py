"""The torch-free ``.pth`` reader (``models.pth``) against ``torch.load(weights_only=True)``.

Files are written with ``torch.save`` in both of its formats (zip, the default, and the legacy
stream of ``_use_new_zipfile_serialization=False``) and read back by both readers; every array
must match torch's bit for bit, with its dtype and shape (bfloat16: torch's ``.float()``).
Refusals (pickle globals other than tensors' and containers', damaged files) must be one line
naming the file, with nothing from the file executed. A subprocess in which torch cannot be
imported loads every zoo model (but Gemma 3, whose GGUF tokenizer conversion in transformers
imports torch) and extracts features, and torch must stay unimported there.
"""

from __future__ import annotations

import argparse
import ast
import collections
import io
import json
import math
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from vlmsel_jax.features import feature_bank
from vlmsel_jax import zoo
from vlmsel_jax.models import (
    CheckpointFileError,
    HFDirectory,
    TorchStateDict,
    load_model,
    load_pretrained,
    read_torch_state_dict,
)
from vlmsel_jax.models import loading, pth
from vlmsel_jax.models.efficientnet import EfficientNetConfig

FORMATS = {"zip": True, "legacy": False}
# Gemma 3 270M's tokenizer, "Hello  world\n\n<start_of_turn>user" -> <bos> Hello ▁▁ world \n\n
# <start_of_turn> user (tests/models/test_gguf_gemma3.py checks it against transformers' GGUF tokenizer).
GEMMA3_TEXT = "Hello  world\n\n<start_of_turn>user"
GEMMA3_IDS = [2, 9259, 138, 12392, 108, 105, 2364]


def _torch():
  return pytest.importorskip("torch")


def _save(obj, path: Path, fmt: str) -> Path:
  _torch().save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
  return path


def _reference(tensor) -> np.ndarray:
  """What the reader must give for a tensor torch.load returned."""
  torch = _torch()
  tensor = tensor.detach().resolve_conj().resolve_neg()
  return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _assert_bit_exact(ours: np.ndarray, ref: np.ndarray, key: str) -> None:
  assert (ours.dtype, ours.shape) == (ref.dtype, ref.shape), key
  assert np.array_equal(ours, ref, equal_nan=ours.dtype.kind in "fc"), key
  # Bits, not just values: -0.0 and NaN payloads must survive too.
  assert np.ascontiguousarray(ours).tobytes() == np.ascontiguousarray(ref).tobytes(), key


def _assert_reads_like_torch(path: Path) -> dict[str, np.ndarray]:
  """Reads ``path`` with both readers; returns ours after checking it against torch.load's."""
  torch = _torch()
  ref = torch.load(path, weights_only=True)
  ours = dict(read_torch_state_dict(path))
  expected = [k for k in ref if not k.endswith("num_batches_tracked")]
  assert list(ours) == expected
  for key in expected:
    _assert_bit_exact(ours[key], _reference(ref[key]), key)
  return ours


def _zip_globals(path: Path) -> set[str]:
  """The "module name" globals a zip checkpoint's data.pkl names."""
  with zipfile.ZipFile(path) as z:
    data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
  return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
  """Copies a torch zip archive, with the records named by their suffix in ``replace``."""
  with zipfile.ZipFile(src) as z_in, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z_out:
    for info in z_in.infolist():
      suffix = info.filename.split("/", 1)[1]
      z_out.writestr(info.filename, replace.get(suffix, z_in.read(info)))
  return dst


# ---------------------------------------------------------------------------------------------
# Values, dtypes, views.


def _every_dtype():
  torch = _torch()
  g = torch.Generator().manual_seed(0)
  floats = torch.randn(4, 5, generator=g, dtype=torch.float64) * 100
  special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-310, 1e-40, 6e-8, 65504.0,
                          3.4e38, -1.5, 2.0 ** -126], dtype=torch.float64)
  tensors = {}
  for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    name = str(dtype).removeprefix("torch.")
    tensors[name] = floats.to(dtype)
    tensors[f"{name}_special"] = special.to(dtype)
  for dtype, (low, high) in {torch.int64: (-2 ** 62, 2 ** 62), torch.int32: (-2 ** 31, 2 ** 31 - 1),
                             torch.int16: (-2 ** 15, 2 ** 15 - 1), torch.int8: (-128, 127),
                             torch.uint8: (0, 255)}.items():
    tensors[str(dtype).removeprefix("torch.")] = torch.randint(low, high, (3, 7), generator=g,
                                                               dtype=dtype)
  tensors["bool"] = torch.rand(2, 9, generator=g) > 0.5
  tensors["complex64"] = torch.randn(3, generator=g, dtype=torch.complex64)
  tensors["complex128"] = torch.randn(2, 2, generator=g, dtype=torch.complex128)
  return tensors


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_reads_bit_exact(tmp_path, fmt):
  torch = _torch()
  tensors = _every_dtype()
  path = _save(tensors, tmp_path / "dtypes.pth", fmt)
  ours = _assert_reads_like_torch(path)
  assert {k: str(v.dtype) for k, v in ours.items() if "_" not in k} == {
      "float32": "float32", "float16": "float16", "bfloat16": "float32", "float64": "float64",
      "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8",
      "bool": "bool", "complex64": "complex64", "complex128": "complex128"}
  # bfloat16 -> float32 by bit shift is exactly ml_dtypes' bfloat16 widened.
  bits = tensors["bfloat16_special"].view(torch.int16).numpy()
  np.testing.assert_array_equal(ours["bfloat16_special"],
                                bits.view(ml_dtypes.bfloat16).astype(np.float32))
  if fmt == "zip":
    assert "torch BFloat16Storage" in _zip_globals(path)


def test_new_dtypes_with_untyped_storage(tmp_path):
  """uint16/32/64 pickle as an UntypedStorage plus a torch.<dtype> global (_rebuild_tensor_v3)."""
  torch = _torch()
  values = np.array([[0, 1, 2 ** 15, 2 ** 16 - 1]], np.int64)
  tensors = {"uint16": torch.from_numpy(values).to(torch.uint16),
             "uint32": torch.from_numpy(values * 65537).to(torch.uint32),
             "uint64": torch.from_numpy(values * 2 ** 40).to(torch.uint64)}
  tensors["uint16_t"] = tensors["uint16"].t()
  path = _save(tensors, tmp_path / "unsigned.pth", "zip")
  assert {"torch.storage UntypedStorage", "torch uint16", "torch._utils _rebuild_tensor_v3"} <= (
      _zip_globals(path))
  _assert_reads_like_torch(path)
  # torch's own legacy reader cannot read these back (an UntypedStorage has no dtype); ours can.
  path = _save(tensors, tmp_path / "unsigned_legacy.pth", "legacy")
  ours = dict(read_torch_state_dict(path))
  for key, tensor in tensors.items():
    _assert_bit_exact(ours[key], tensor.numpy(), key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_of_one_storage(tmp_path, fmt):
  torch = _torch()
  x = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 7
  ints = torch.arange(30, dtype=torch.int64).reshape(5, 6)
  tensors = {
      "x": x, "transposed": x.t(), "every_other_column": x[:, ::2], "rows_from_1": x[1:],
      "block": x[2:5, 1::3], "flat_slice": x.view(-1)[5:9], "scalar_view": x[3, 4],
      "expanded": x[0, :3].expand(4, 3), "ints_t": ints.t()[1:, ::2], "ints": ints,
  }
  path = _save(tensors, tmp_path / "views.pth", fmt)
  loaded = torch.load(path, weights_only=True)
  # The file really holds two storages, shared as in memory.
  assert len({t.untyped_storage().data_ptr() for t in loaded.values()}) == 2
  ours = _assert_reads_like_torch(path)
  assert ours["rows_from_1"].shape == (5, 8) and ours["scalar_view"].shape == ()
  assert ours["transposed"].flags.c_contiguous and ours["transposed"].flags.writeable
  # An expanded view is broadcast (stride 0), not multiplied out.
  assert ours["expanded"].strides[0] == 0 and not ours["expanded"].flags.writeable
  if fmt == "zip":
    with zipfile.ZipFile(path) as z:
      assert len([n for n in z.namelist() if "/data/" in n]) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_scalars_empties_parameters_and_tensor_state(tmp_path, fmt):
  torch = _torch()
  param_with_state = torch.nn.Parameter(torch.randn(3, 2))
  param_with_state.note = "extra attribute"
  tensor_with_state = torch.linspace(-1, 1, 5)
  tensor_with_state.note = "extra attribute"
  tensors = {
      "scalar": torch.tensor(2.5), "int_scalar": torch.tensor(-7), "empty": torch.zeros(0),
      "empty_2d": torch.zeros(0, 3), "empty_mid": torch.ones(2, 0, 4, dtype=torch.int32),
      "param": torch.nn.Parameter(torch.randn(4)), "frozen": torch.nn.Parameter(
          torch.randn(2, 2), requires_grad=False),
      "param_with_state": param_with_state, "tensor_with_state": tensor_with_state,
      "conj": torch.complex(torch.ones(3), torch.arange(3.0)).conj(),
      "neg": torch._neg_view(torch.arange(4.0)),  # pylint: disable=protected-access
  }
  path = _save(tensors, tmp_path / "misc.pth", fmt)
  ours = _assert_reads_like_torch(path)
  assert ours["scalar"].shape == () and ours["empty_mid"].shape == (2, 0, 4)
  np.testing.assert_array_equal(ours["neg"], -np.arange(4.0, dtype=np.float32))
  if fmt == "zip":
    assert {"torch._utils _rebuild_parameter", "torch._utils _rebuild_parameter_with_state",
            "torch._tensor _rebuild_from_type_v2", "torch Tensor"} <= _zip_globals(path)


def _small_module():
  torch = _torch()
  torch.manual_seed(0)
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 1, bias=False), torch.nn.BatchNorm2d(4))
  module.train()
  with torch.no_grad():
    for _ in range(2):  # Non-trivial running statistics and a step count.
      module(torch.randn(2, 3, 9, 9))
  return module


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_skips_num_batches_tracked(tmp_path, fmt):
  state = _small_module().state_dict()
  assert isinstance(state, collections.OrderedDict) and "1.num_batches_tracked" in state
  path = _save(state, tmp_path / "module.pth", fmt)
  ours = _assert_reads_like_torch(path)
  assert list(ours) == [k for k in state if not k.endswith("num_batches_tracked")]
  assert ours["1.running_var"].dtype == np.float32 and ours["3.weight"].shape == (4, 8, 1, 1)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict(tmp_path, fmt, wrapper):
  torch = _torch()
  module = _small_module()
  optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
  module(torch.randn(1, 3, 9, 9)).sum().backward()
  optimizer.step()
  path = _save({"epoch": 3, wrapper: module.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "wrapped.pth", fmt)
  ours = dict(read_torch_state_dict(path))
  state = module.state_dict()
  assert list(ours) == [k for k in state if not k.endswith("num_batches_tracked")]
  for key, value in ours.items():
    _assert_bit_exact(value, _reference(state[key]), key)


def test_big_endian_zip_is_byteswapped(tmp_path):
  """A zip whose byteorder record says "big" (as a big-endian host writes it) reads the same."""
  _torch()  # The reference must be there to compare with.
  tensors = {k: v for k, v in _every_dtype().items() if not k.endswith("_special")}
  path = _save(tensors, tmp_path / "little.pth", "zip")
  swapped = {}
  with zipfile.ZipFile(path) as z:
    for key, tensor in zip(map(str, range(len(tensors))), tensors.values()):
      # torch numbers the storages in pickling order: one per tensor here.
      itemsize = tensor.element_size() // (2 if tensor.is_complex() else 1)
      data = np.frombuffer(z.read(f"little/data/{key}"), f"<u{itemsize}" if itemsize > 1 else "u1")
      swapped[f"data/{key}"] = data.byteswap().tobytes()
  big = _rewrite_zip(path, tmp_path / "big.pth", {**swapped, "byteorder": b"big"})
  # torch byteswaps on load too: both readers agree with each other and with the original.
  ours = _assert_reads_like_torch(big)
  for key, tensor in tensors.items():
    _assert_bit_exact(ours[key], _reference(tensor), key)


def test_zip_with_another_top_folder_name(tmp_path):
  torch = _torch()
  buffer = io.BytesIO()
  torch.save({"w": torch.arange(6.0).reshape(2, 3)}, buffer)  # Top folder "archive".
  path = tmp_path / "renamed.pt"
  path.write_bytes(buffer.getvalue())
  with zipfile.ZipFile(path) as z:
    assert z.namelist()[0].startswith("archive/")
  _assert_reads_like_torch(path)


class _Storage:
  """A storage of a hand-written legacy file; it pickles as its persistent id."""

  def __init__(self, pid):
    self.pid = pid


class _TensorRecipe:
  """Pickles as torch's _rebuild_tensor_v2 call over a ``_Storage``."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return _torch()._utils._rebuild_tensor_v2, self.args  # pylint: disable=protected-access


def _write_legacy(path: Path, obj, storages: dict[str, np.ndarray]) -> Path:
  """A legacy torch.save stream, written by hand: lets a test use old features (storage views)."""

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      return obj.pid if isinstance(obj, _Storage) else None

  with open(path, "wb") as f:
    pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 8}}, f, protocol=2)
    Pickler(f, protocol=2).dump(obj)
    pickle.dump(sorted(storages), f, protocol=2)
    for key in sorted(storages):
      f.write(struct.pack("<q", storages[key].size) + storages[key].astype("<f4").tobytes())
  return path


def test_legacy_storage_views(tmp_path):
  """Old legacy files name storage views (view key, offset, numel) in their persistent ids."""
  torch = _torch()
  root = np.arange(20, dtype=np.float32) * 1.5
  whole = _Storage(("storage", torch.FloatStorage, "root", "cpu", 20, None))
  view = _Storage(("storage", torch.FloatStorage, "root", "cpu", 20, ("view", 6, 9)))
  obj = collections.OrderedDict([
      ("whole", _TensorRecipe(whole, 0, (4, 5), (5, 1))),
      ("view", _TensorRecipe(view, 0, (3, 3), (3, 1))),
      ("view_t", _TensorRecipe(view, 1, (2, 2), (1, 3))),
  ])
  path = _write_legacy(tmp_path / "views.pth", obj, {"root": root})
  ours = _assert_reads_like_torch(path)
  np.testing.assert_array_equal(ours["view"], root[6:15].reshape(3, 3))


# ---------------------------------------------------------------------------------------------
# Refusals.


class _Evil:
  """Unpickling this runs ``func(arg)``: what a malicious checkpoint does."""

  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


def _attacks(marker: Path):
  touch = f"open({str(marker)!r}, 'w').close()"
  return {"os.system": (os.system, f"touch {marker}"), "eval": (eval, touch),
          "exec": (exec, touch)}


def _qualified(func) -> str:
  return f"{func.__module__}.{func.__name__}"


@pytest.mark.parametrize("attack", ["os.system", "eval", "exec"])
@pytest.mark.parametrize("layout", ["torch_save_zip", "torch_save_legacy", "zip_data_pkl",
                                    "legacy_main_pickle"])
def test_forbidden_global_is_refused_and_never_runs(tmp_path, attack, layout):
  torch = _torch()
  marker = tmp_path / "pwned"
  func, arg = _attacks(marker)[attack]
  evil = _Evil(func, arg)
  path = tmp_path / f"{layout}.pth"
  if layout.startswith("torch_save"):
    _save({"w": torch.ones(2), "payload": evil}, path, layout.rsplit("_", 1)[1])
  elif layout == "zip_data_pkl":
    _rewrite_zip(_save({"w": torch.ones(2)}, tmp_path / "clean.pth", "zip"), path,
                 {"data.pkl": pickle.dumps({"w": evil}, protocol=2)})
  else:
    with open(path, "wb") as f:
      for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"w": evil}, []):
        pickle.dump(obj, f, protocol=2)
  with pytest.raises(CheckpointFileError) as info:
    list(read_torch_state_dict(path))
  assert str(info.value) == (f"{path}: refusing to load pickle global {_qualified(func)} "
                             "(only tensors and containers are read)")
  assert not marker.exists()
  # torch's weights_only reader refuses them too (the file is really an attack).
  with pytest.raises(pickle.UnpicklingError):
    torch.load(path, weights_only=True)
  assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_arbitrary_class_instance_is_refused(tmp_path, fmt):
  torch = _torch()
  path = _save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pth",
               fmt)
  with pytest.raises(CheckpointFileError) as info:
    list(TorchStateDict(path))
  assert str(info.value) == (f"{path}: refusing to load pickle global argparse.Namespace (only "
                             "tensors and containers are read)")


def test_non_state_dicts_and_non_tensors(tmp_path):
  torch = _torch()
  torch.save([torch.zeros(2)], tmp_path / "list.pth")
  with pytest.raises(CheckpointFileError, match=r"list\.pth: expected a state dict, got list$"):
    list(read_torch_state_dict(tmp_path / "list.pth"))
  torch.save({"w": torch.zeros(2), "nested": {"b": torch.ones(1)}}, tmp_path / "nested.pth")
  with pytest.raises(CheckpointFileError, match=r"key 'nested' holds a dict, not a tensor$"):
    list(read_torch_state_dict(tmp_path / "nested.pth"))
  # Containers and plain values beside the state dict are fine: they are read, then ignored.
  torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": {"sizes": {1, 2}, "name": b"x",
                                                               "shape": torch.Size([2, 3]),
                                                               "c": 1 + 2j}},
             tmp_path / "extras.pth")
  assert list(dict(read_torch_state_dict(tmp_path / "extras.pth"))) == ["w"]


def _damaged(kind: str, tmp_path: Path) -> Path:
  path = tmp_path / f"{kind}.pth"
  if kind == "random_bytes":
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  elif kind == "empty":
    path.write_bytes(b"")
  elif kind == "plain_pickle":
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
  elif kind == "zip_without_data_pkl":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/weights.bin", b"\0" * 16)
  elif kind == "tar":
    with tarfile.open(path, "w") as tar:
      for name in ("sys_info", "pickle", "tensors", "storages"):
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\0" * 4))
  elif kind == "zip_missing_storage":
    clean = _save({"w": _torch().ones(3)}, tmp_path / "clean.pth", "zip")
    with zipfile.ZipFile(clean) as z_in, zipfile.ZipFile(path, "w") as z_out:
      for info in z_in.infolist():
        if not info.filename.endswith("/data/0"):
          z_out.writestr(info.filename, z_in.read(info))
  elif kind == "zip_short_storage":
    clean = _save({"w": _torch().ones(3)}, tmp_path / "clean.pth", "zip")
    _rewrite_zip(clean, path, {"data/0": b"\0" * 8})
  return path


@pytest.mark.parametrize("kind", ["random_bytes", "empty", "plain_pickle", "zip_without_data_pkl",
                                  "tar", "zip_missing_storage", "zip_short_storage"])
def test_not_a_checkpoint_is_one_line(tmp_path, kind):
  if kind.startswith("zip_") and "data_pkl" not in kind:
    _torch()
  path = _damaged(kind, tmp_path)
  with pytest.raises(CheckpointFileError) as info:
    list(read_torch_state_dict(path))
  message = str(info.value)
  assert message.startswith(f"{path}: ") and "\n" not in message
  if kind == "tar":
    assert "tar archive" in message and "not supported" in message
  else:
    assert message.startswith(f"{path}: unreadable PyTorch checkpoint, truncated or corrupt (")


def test_missing_file(tmp_path):
  with pytest.raises(CheckpointFileError, match=r"nope\.pth: no such checkpoint file$"):
    list(read_torch_state_dict(tmp_path / "nope.pth"))
  with pytest.raises(CheckpointFileError, match=r"no such checkpoint file$"):
    list(TorchStateDict(tmp_path))  # A directory is no file either.


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_anywhere_is_one_line(tmp_path, fmt):
  torch = _torch()
  data = _save({"a": torch.randn(40, 3), "b": torch.arange(10)}, tmp_path / "full.pth",
               fmt).read_bytes()
  cut = tmp_path / "cut.pth"
  for length in sorted({1, 4, 30, 100} | set(range(0, len(data), max(1, len(data) // 40))) |
                       {len(data) - 1, len(data) - 8}):
    cut.write_bytes(data[:length])
    with pytest.raises(CheckpointFileError) as info:
      list(read_torch_state_dict(cut))
    assert str(info.value).startswith(f"{cut}: unreadable PyTorch checkpoint, truncated or "
                                      "corrupt ("), length
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_damage_never_escapes_as_another_error(tmp_path, fmt):
  """Flipped bytes either still parse or fail as one CheckpointFileError line, nothing else."""
  torch = _torch()
  data = bytearray(_save({"a": torch.randn(3, 4), "b": torch.arange(5).t(), "c": torch.tensor(1.0)},
                         tmp_path / "full.pth", fmt).read_bytes())
  rng = np.random.default_rng(1)
  damaged = tmp_path / "damaged.pth"
  # The pickles are where the structure is: the first kilobyte of either format.
  for _ in range(300):
    mutated = bytearray(data)
    for pos in rng.integers(0, min(len(data), 1024), rng.integers(1, 4)):
      mutated[pos] = int(rng.integers(0, 256))
    damaged.write_bytes(bytes(mutated))
    try:
      for _, array in read_torch_state_dict(damaged):
        assert isinstance(array, np.ndarray)
    except CheckpointFileError as e:
      assert str(e).startswith(f"{damaged}: ") and "\n" not in str(e)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories with pytorch_model.bin, and the zoo's EfficientNet-Lite weights.

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64)


def _params(model) -> dict[str, np.ndarray]:
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        flat[f"{prefix}{k}"] = np.asarray(v)

  walk(nnx.to_pure_dict(nnx.state(model)), "")
  return flat


def _assert_same_params(a, b) -> None:
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys() and pa
  for key in pa:
    _assert_bit_exact(pa[key], pb[key], key)


@pytest.fixture(scope="module", params=["untied", "tied"])
def llama_dirs(request, tmp_path_factory):
  """A tiny random Llama saved as safetensors (save_pretrained) and as pytorch_model.bin."""
  torch = _torch()
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp(f"llama_{request.param}")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**TINY, tie_word_embeddings=request.param == "tied")
  model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(root / "safetensors")
  # transformers 5 dropped save_pretrained(safe_serialization=False): write the .bin by hand.
  config.save_pretrained(root / "bin")
  state = model.state_dict()
  torch.save(state, root / "bin" / "pytorch_model.bin")
  return root, state


def test_hf_directory_pytorch_model_bin(llama_dirs):
  root, state = llama_dirs
  source = HFDirectory(root / "bin")
  assert [f.name for f in source.files] == ["pytorch_model.bin"]
  shared = state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
  assert shared == json.loads((root / "bin" / "config.json").read_text())["tie_word_embeddings"]
  if shared:
    # Tied: two keys of one storage; the reader gives both, the key table skips lm_head.
    pairs = dict(source)
    np.testing.assert_array_equal(pairs["lm_head.weight"], pairs["model.embed_tokens.weight"])
  _assert_same_params(load_pretrained(root / "bin"), load_pretrained(root / "safetensors"))


def test_hf_directory_sharded_pytorch_model_bin(llama_dirs, tmp_path):
  torch = _torch()
  root, state = llama_dirs
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  (sharded / "config.json").write_bytes((root / "bin" / "config.json").read_bytes())
  keys = list(state)
  weight_map = {}
  for i, chunk in enumerate(np.array_split(np.arange(len(keys)), 3)):
    name = f"pytorch_model-{i + 1:05d}-of-00003.bin"
    torch.save({keys[j]: state[keys[j]] for j in chunk}, sharded / name,
               _use_new_zipfile_serialization=i != 1)  # Formats may mix.
    weight_map.update({keys[j]: name for j in chunk})
  (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": weight_map}))
  assert len(HFDirectory(sharded).files) == 3
  _assert_same_params(load_pretrained(sharded), load_pretrained(root / "safetensors"))
  (sharded / "pytorch_model-00003-of-00003.bin").unlink()
  with pytest.raises(CheckpointFileError, match=r"pytorch_model-00003-of-00003\.bin: shard listed "
                     r"in pytorch_model\.bin\.index\.json does not exist"):
    load_pretrained(sharded)


def test_hf_directory_prefers_safetensors_and_names_every_weight_file(llama_dirs, tmp_path):
  root, _ = llama_dirs
  both = tmp_path / "both"
  both.mkdir()
  for f in (root / "safetensors").iterdir():
    (both / f.name).write_bytes(f.read_bytes())
  (both / "pytorch_model.bin").write_bytes(b"not read: safetensors come first")
  assert [f.name for f in HFDirectory(both).files] == ["model.safetensors"]
  load_pretrained(both)
  (both / "model.safetensors").unlink()
  with pytest.raises(CheckpointFileError, match=r"pytorch_model\.bin: unreadable PyTorch "
                     r"checkpoint, truncated or corrupt"):
    load_pretrained(both)
  (both / "pytorch_model.bin").unlink()
  with pytest.raises(CheckpointFileError) as info:
    load_pretrained(both)
  assert str(info.value) == (f"{both / 'model.safetensors'}: no such file (nor "
                             "model.safetensors.index.json, pytorch_model.bin or "
                             "pytorch_model.bin.index.json)")


def test_zoo_lite0_weights_equal_a_torch_load():
  """The zoo's lite0, read without torch, has exactly the parameters a torch.load gives."""
  torch = _torch()
  try:
    path = zoo.resolve("efficientnet-lite0").path
  except zoo.ZooError as e:
    pytest.skip(str(e))
  config = EfficientNetConfig.lite("lite0").to_dict()
  state = torch.load(path, weights_only=True)
  reference = load_model(config, [(k, _reference(v)) for k, v in state.items()
                                  if not k.endswith("num_batches_tracked")])
  _assert_same_params(zoo.load("efficientnet-lite0").model, reference)
  _assert_same_params(load_model(config, TorchStateDict(path)), reference)


# ---------------------------------------------------------------------------------------------
# No torch at all.

_NO_TORCH_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # `import torch` (and torch.*) now raises ImportError.
    import json
    import jax
    from vlmsel_jax.features import extraction
    from vlmsel_jax import zoo

    data_dir, out_dir, text = sys.argv[1], sys.argv[2], sys.argv[3]
    skipped = set(filter(None, sys.argv[4].split(",")))
    loaded, tokenized = {}, {}
    for name in zoo.names():
      if name not in skipped:
        entry = zoo.load(name)
        loaded[name] = type(entry.model).__name__
        if entry.tokenizer is not None:
          tokenized[name] = entry.tokenizer(text).input_ids
    # The GGUF tokenizers are built from gguf's metadata: transformers' GGUF reader (which
    # imports torch) is never reached.
    gguf_reader_imported = "transformers.integrations.gguf.reader" in sys.modules
    results = extraction.extract(
        ["efficientnet-lite0", "minilm-l6"], data_dir, out_dir,
        options=extraction.ExtractOptions(batch_size=2, progress=False),
        devices=jax.devices()[:1])
    torch_modules = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("RESULT " + json.dumps({
        "loaded": loaded, "tokenized": tokenized, "gguf_reader_imported": gguf_reader_imported,
        "torch_is_none": sys.modules["torch"] is None,
        "torch_modules": torch_modules,
        "banks": [[r.name, r.n, r.dim, r.cached] for r in results]}))
""")


def test_reader_module_stands_alone():
  """pth imports of vlmsel_jax only the shared checkpoint module (no cycle with loading), whose
  file error it raises, and no torch, jax or flax."""
  tree = ast.parse(Path(pth.__file__).read_text())
  imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
  imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
  assert [m for m in imported if m.startswith("vlmsel_jax")] == ["vlmsel_jax.models.checkpoint"]
  assert not [m for m in imported if m.split(".")[0] in ("torch", "jax", "flax")]
  assert loading.CheckpointFileError is pth.CheckpointFileError is CheckpointFileError


def test_zoo_loads_and_extracts_without_torch(tmp_path):
  for name in ("efficientnet-lite0", "minilm-l6"):
    try:
      zoo.resolve(name)
    except zoo.ZooError as e:
      pytest.skip(str(e))
  data = tmp_path / "data"
  (data / "img").mkdir(parents=True)
  rng = np.random.default_rng(0)
  rows = []
  for i, size in enumerate([(40, 52), (64, 48)]):
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(data / f"img/{i}.png")
    rows.append({"id": i, "image": f"img/{i}.png", "caption": f"random picture number {i}"})
  (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  # Every zoo model loads without torch; only those whose packages are not installed are left out.
  missing = set()
  for name in zoo.names():
    try:
      zoo.resolve(name)
    except zoo.ZooError:
      missing.add(name)
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLMSEL_CACHE": str(tmp_path / "cache")}
  proc = subprocess.run(
      [sys.executable, "-c", _NO_TORCH_SCRIPT, str(data), str(tmp_path / "banks"), GEMMA3_TEXT,
       ",".join(sorted(missing))],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert result["torch_is_none"] and result["torch_modules"] == ["torch"], result
  assert sorted(result["loaded"]) == sorted(set(zoo.names()) - missing)
  assert result["loaded"]["efficientnet-lite0"] == "EfficientNetLite"
  assert not result["gguf_reader_imported"]
  if "gemma3-270m" not in missing:
    assert result["loaded"]["gemma3-270m"] == "Gemma3"
    assert result["tokenized"]["gemma3-270m"] == GEMMA3_IDS
  assert result["banks"] == [["efficientnet-lite0", 2, 1280, False], ["minilm-l6", 2, 384, False]]
  bank = feature_bank.load_bank(str(tmp_path / "banks" / "efficientnet-lite0.safetensors"))
  assert bank.features.shape == (2, 1280) and np.isfinite(bank.features).all()
