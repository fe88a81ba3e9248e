"""PyTorch ``torch.save`` files (``.pth``, ``.pt``, ``pytorch_model.bin``) read with NumPy alone.

A restricted unpickler stands in for ``torch.load(weights_only=True)``: it reads the zip format
(``torch.save``'s default since 1.6: ``<archive>/data.pkl`` with one ``<archive>/data/<key>``
record per storage and a ``<archive>/byteorder`` record) and the legacy stream
(``_use_new_zipfile_serialization=False``: magic number, protocol and system-info pickles, the
main pickle, the list of storage keys, then every storage's bytes after an int64 element count).
The tar format of PyTorch's first releases is refused, as ``torch.load(weights_only=True)``
refuses it too.

Only an allow-list of pickle globals resolves: ``collections.OrderedDict``, a few harmless
builtins, torch's storage classes and dtypes (as markers) and its tensor / parameter rebuild
functions, which are replaced by functions here that record where a tensor's elements lie. Any
other global (``os.system``, a training script's class, ...) fails the file with one line; no code
from the file ever runs. A tensor becomes a NumPy array only when it is yielded, copied out of a
memory map of the file, so a state dict is never held twice in memory.

torch's bfloat16 becomes float32, exactly (its 16 bits are the top half of a float32): NumPy has
no bfloat16 of its own, and the loader casts every tensor to the model's dtype anyway.

``TorchStateDict`` is such a file as a checkpoint source for ``loading.load_model``; of
``vlmsel_jax`` this module imports only ``checkpoint``, whose ``CheckpointFileError`` it raises.

Typical use::

  model = loading.load_model({"model_type": "efficientnet_lite", "variant": "lite0"},
                             TorchStateDict("efficientnet-lite0.pth"))
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import dataclasses
import io
import math
import mmap
import os
import pickle
import reprlib
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np

from vlmsel_jax.models.checkpoint import CheckpointFileError

__all__ = ["TorchStateDict", "read_torch_state_dict"]

# Keys a checkpoint may wrap its state dict in: Lightning and many training scripts save
# {"state_dict": ..., "epoch": ...} or {"model": ..., "optimizer": ...}.
WRAPPER_KEYS = ("state_dict", "model")

# BatchNorm's training-step counter: only drives the momentum schedule when training.
SKIPPED_SUFFIX = "num_batches_tracked"

# torch.serialization's MAGIC_NUMBER and PROTOCOL_VERSION, the first two legacy pickles.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


class _Corrupt(ValueError):
  """A file that does not parse as a checkpoint; becomes a one-line ``CheckpointFileError``."""


@dataclasses.dataclass(frozen=True)
class _Dtype:
  """A torch dtype: how its elements are stored (little-endian) and what NumPy dtype they read as.

  Attributes:
    name: torch's name (``torch.<name>`` is its pickle global).
    stored: NumPy dtype of the stored bytes, little-endian; bfloat16's are read as uint16.
  """

  name: str
  stored: str

  @property
  def itemsize(self) -> int:
    return np.dtype(self.stored).itemsize

  def file_dtype(self, big_endian: bool) -> np.dtype:
    stored = np.dtype(self.stored)
    return stored.newbyteorder(">") if big_endian else stored

  def values(self, stored: np.ndarray) -> np.ndarray:
    """A native-order copy of ``stored`` (elements as in the file) as this dtype's values."""
    if self.name == "bfloat16":
      # bfloat16 is the top half of a float32: shifting its bits up is exact.
      return (stored.astype(np.uint32, order="C") << 16).view(np.float32)
    return stored.astype(np.dtype(self.stored).newbyteorder("="), order="C", copy=True)


_DTYPES = {d.name: d for d in (
    _Dtype("float64", "<f8"), _Dtype("float32", "<f4"), _Dtype("float16", "<f2"),
    _Dtype("bfloat16", "<u2"), _Dtype("complex128", "<c16"), _Dtype("complex64", "<c8"),
    _Dtype("int64", "<i8"), _Dtype("int32", "<i4"), _Dtype("int16", "<i2"), _Dtype("int8", "i1"),
    _Dtype("uint64", "<u8"), _Dtype("uint32", "<u4"), _Dtype("uint16", "<u2"),
    _Dtype("uint8", "u1"), _Dtype("bool", "?"))}

# torch's legacy storage classes (still what a tensor's storage pickles as) -> element dtype.
_LEGACY_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """A storage class global; ``dtype`` is uint8 for ``UntypedStorage`` (its numel is bytes)."""

  name: str
  dtype: _Dtype


@dataclasses.dataclass(frozen=True)
class _TensorType:
  """``torch.Tensor`` / ``torch.nn.Parameter`` as ``_rebuild_from_type_v2`` names them."""

  name: str


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage of the file: ``nbytes`` bytes at ``byte_offset`` of record ``key``.

  ``byte_offset`` is non-zero only for the storage views of old legacy files.
  """

  key: str
  dtype: _Dtype
  nbytes: int
  byte_offset: int = 0


class _Tensor:
  """Where a tensor's elements lie: a strided view of a storage, read when yielded."""

  __slots__ = ("storage", "dtype", "offset", "shape", "strides", "negate", "conjugate")

  def __init__(self, storage: Any, dtype: Any, offset: Any, shape: Any, strides: Any,
               metadata: Any = None):
    if not isinstance(storage, _StorageRef):
      raise _Corrupt(f"a tensor's storage is a {type(storage).__name__}")
    if not isinstance(dtype, _Dtype):
      raise _Corrupt(f"a tensor's dtype is a {type(dtype).__name__}")
    shape, strides = _int_tuple(shape, "size"), _int_tuple(strides, "stride")
    if not _is_int(offset) or offset < 0 or len(shape) != len(strides) or min(
        shape + strides, default=0) < 0:
      raise _Corrupt(f"bad tensor geometry: offset {_short(offset)}, size {_short(shape)}, "
                     f"stride {_short(strides)}")
    if storage.nbytes % dtype.itemsize:
      raise _Corrupt(f"a {storage.nbytes}-byte storage does not hold {dtype.name} elements")
    if math.prod(shape):
      last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
      if last >= storage.nbytes // dtype.itemsize:
        raise _Corrupt(f"tensor of size {shape}, stride {strides} at offset {offset} runs past "
                       f"its storage of {storage.nbytes // dtype.itemsize} elements")
    flags = dict(metadata or {})
    unknown = sorted(k for k, v in flags.items() if v and k not in ("neg", "conj"))
    if unknown:
      raise _Corrupt(f"unsupported tensor metadata {unknown}")
    self.storage, self.dtype, self.offset = storage, dtype, offset
    self.shape, self.strides = shape, strides
    self.negate, self.conjugate = bool(flags.get("neg")), bool(flags.get("conj"))


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
    raise _Corrupt(f"a tensor's {what} is {_short(value)}")
  return tuple(value)


# The rebuild functions torch pickles tensors with, as this reader implements them. Their
# requires_grad and backward-hook arguments do not matter to an array, nor a tensor's Python state.


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _Tensor(storage, getattr(storage, "dtype", None), storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  del requires_grad, backward_hooks
  return _Tensor(storage, getattr(storage, "dtype", None), storage_offset, size, stride, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  # The dtypes torch has no legacy storage class for (uint16, ...) come with an untyped storage.
  del requires_grad, backward_hooks
  return _Tensor(storage, dtype, storage_offset, size, stride, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad, backward_hooks
  if not isinstance(data, _Tensor):
    raise _Corrupt(f"a parameter holds a {type(data).__name__}")
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del state
  return _rebuild_parameter(data, requires_grad, backward_hooks)


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
               _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
  # A tensor with Python attributes (or of a subclass) pickles as this around a rebuild function.
  del state
  if func not in _REBUILDERS or not isinstance(new_type, _TensorType):
    raise _Corrupt(f"_rebuild_from_type_v2 of {_short(func)} as {_short(new_type)}")
  if not isinstance(args, tuple):
    raise _Corrupt(f"_rebuild_from_type_v2 arguments are a {type(args).__name__}")
  return func(*args)


def _encode(text, encoding="utf-8"):
  # Protocol-2 pickles store bytes as _codecs.encode(latin-1 text, "latin1"); nothing else.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _Corrupt(f"_codecs.encode of a {type(text).__name__} as {_short(encoding)}")
  return text.encode("latin-1")


def _allowed_globals() -> dict[str, Any]:
  """"module.name" -> what it unpickles as; the only globals a file may name."""
  allowed: dict[str, Any] = {
      "collections.OrderedDict": collections.OrderedDict,
      "builtins.set": set,
      "builtins.frozenset": frozenset,
      "builtins.complex": complex,
      "_codecs.encode": _encode,
      "torch.Size": tuple,
      "torch.Tensor": _TensorType("Tensor"),
      "torch.nn.parameter.Parameter": _TensorType("Parameter"),
      "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
  }
  for f in _REBUILDERS:
    allowed[f"torch._utils.{f.__name__}"] = f
  for name, dtype in _DTYPES.items():
    allowed[f"torch.{name}"] = dtype
  for name, dtype_name in _LEGACY_STORAGES.items():
    # Old legacy files name a CUDA tensor's storage torch.cuda.FloatStorage; it loads to the CPU.
    for module in ("torch", "torch.cuda"):
      allowed[f"{module}.{name}"] = _StorageType(name, _DTYPES[dtype_name])
  for module in ("torch", "torch.storage"):
    allowed[f"{module}.UntypedStorage"] = _StorageType("UntypedStorage", _DTYPES["uint8"])
  return allowed


_ALLOWED_GLOBALS = _allowed_globals()


def _load_build(unpickler: _Unpickler) -> None:
  """BUILD (set an object's state) only for an OrderedDict, whose state is then dropped.

  A state dict's OrderedDict carries ``_metadata`` (module versions) this way. On anything else
  BUILD could rewrite the fields of this module's markers and functions (``__dict__``, setattr)
  behind the checks, so it is refused, as torch's weights_only unpickler refuses it.
  """
  unpickler.stack.pop()
  target = unpickler.stack[-1]
  if type(target) is not collections.OrderedDict:  # pylint: disable=unidiomatic-typecheck
    raise _Corrupt(f"refusing to set the state of a {type(target).__name__}")


class _Dispatch(dict):
  """An unpickler's opcode table; an opcode it lacks is a damaged file, said as such."""

  def __missing__(self, opcode: int) -> Any:
    raise _Corrupt(f"unknown pickle opcode {opcode:#04x}")


class _Unpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Resolves only allow-listed globals; storages become ``_StorageRef``s.

  Python's pure-Python unpickler, not the C one: the C unpickler's memo is an array sized by the
  largest index a file names, so one damaged LONG_BINPUT index makes it allocate gigabytes. This
  one keeps the memo in a dict, reads only what the file holds, and lets BUILD be restricted.
  Checkpoint pickles are small (the tensors' bytes are elsewhere), so its speed does not matter.

  Args:
    file: The pickle stream.
    path: The checkpoint file, for messages.
    storages: Root storage key -> its ``_StorageRef``, shared by the pickles of one file (a
      legacy file's storages follow its main pickle, and its key list names them).
  """

  dispatch = _Dispatch(pickle._Unpickler.dispatch)  # pylint: disable=protected-access
  dispatch[pickle.BUILD[0]] = _load_build
  # Protocol 5's out-of-band buffers: never in torch.save files (protocol 2), and BYTEARRAY8
  # allocates whatever size the file names before reading it.
  for _opcode in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
    del dispatch[_opcode[0]]
  del _opcode

  def __init__(self, file: Any, path: Path, storages: dict[str, _StorageRef]):
    # torch.load reads Python 2 strings as UTF-8 too.
    super().__init__(file, encoding="utf-8")
    self._path = path
    self._storages = storages
    readline = file.readline

    def whole_line() -> bytes:
      # The pure-Python unpickler drops a line's last byte unseen: a global's name cut by a
      # truncation would otherwise read as another (refused) name rather than as the cut.
      line = readline()
      if not line.endswith(b"\n"):
        raise _Corrupt("the file ends inside a pickle")
      return line

    self._file_readline = whole_line

  def find_class(self, module: str, name: str) -> Any:
    # The default find_class maps Python 2 names (protocol < 3); overriding it skips that.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    found = _ALLOWED_GLOBALS.get(f"{module}.{name}")
    if found is None:
      raise CheckpointFileError(f"{self._path}: refusing to load pickle global {module}.{name} "
                                "(only tensors and containers are read)")
    return found

  def persistent_load(self, pid: Any) -> Any:
    # Zip: ("storage", storage type, key, location, numel); legacy adds view metadata.
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _text(pid[0]) != "storage":
      raise _Corrupt(f"unsupported persistent id {_short(pid)}")
    storage_type, key, _, numel = pid[1:5]
    key = _text(key)
    if not isinstance(storage_type, _StorageType) or not key or not _is_int(numel) or numel < 0:
      raise _Corrupt(f"bad storage reference {_short(pid)}")
    dtype = storage_type.dtype
    root = self._storages.setdefault(key, _StorageRef(key, dtype, numel * dtype.itemsize))
    if (root.dtype, root.nbytes) != (dtype, numel * dtype.itemsize):
      raise _Corrupt(f"storage {key} is referenced as {root.dtype.name} x "
                     f"{root.nbytes // root.dtype.itemsize} and as {dtype.name} x {numel}")
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return root
    # Storage views of old legacy files: (view key, offset, numel), in elements.
    if not isinstance(view, tuple) or len(view) != 3 or not all(_is_int(v) for v in view[1:]):
      raise _Corrupt(f"bad storage view {_short(view)}")
    _, offset, size = view
    if offset < 0 or size < 0 or offset + size > numel:
      raise _Corrupt(f"storage view {_short(view)} runs past storage {key} of {numel} elements")
    return dataclasses.replace(root, nbytes=size * dtype.itemsize,
                               byte_offset=offset * dtype.itemsize)


def _text(value: Any) -> str | None:
  """A str, or ASCII bytes (Python 2 pickles) decoded; None for anything else."""
  if isinstance(value, bytes):
    return value.decode("ascii", errors="replace")
  return value if isinstance(value, str) else None


# A bounded repr: a damaged file's values may be huge or nest shared lists exponentially deep.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40


def _short(value: Any) -> str:
  text = _REPR.repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _one_line(e: BaseException) -> str:
  """The first line of an error's message; with its type unless it is this module's own."""
  text = str(e).strip()
  text = text.splitlines()[0] if text else ""
  if isinstance(e, _Corrupt):
    return text
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
  """Turns whatever a damaged file raises into one ``CheckpointFileError`` line naming it."""
  try:
    yield
  except CheckpointFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A damaged pickle or archive raises UnpicklingError, EOFError, BadZipFile, KeyError,
    # TypeError, struct.error, ... depending on where the damage is; all mean the same here.
    raise CheckpointFileError(
        f"{path}: unreadable PyTorch checkpoint, truncated or corrupt ({_one_line(e)})") from None


class _TorchFile:
  """An open ``torch.save`` file: its unpickled object, and its storages' bytes on demand.

  Attributes:
    obj: What ``torch.load`` would return, with ``_Tensor``s for tensors.
  """

  def __init__(self, path: Path):
    self.path = path
    self._file: BinaryIO | None = None
    self._map: Any = None
    self._zip: zipfile.ZipFile | None = None
    self._prefix = ""
    self._big_endian = False
    self._storages: dict[str, _StorageRef] = {}
    # Legacy: root key -> offset of its bytes in the file.
    self._offsets: dict[str, int] = {}
    try:
      with _reading(path):
        self._file = open(path, "rb")  # pylint: disable=consider-using-with
        self.obj = self._load()
    except BaseException:
      self.close()
      raise

  def _load(self) -> Any:
    head = self._file.read(4)
    self._file.seek(0)
    if not head:
      raise _Corrupt("empty file")
    try:
      self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
      # No memory map on this file system: hold the file's bytes instead.
      self._map = self._file.read()
      self._file.seek(0)
    if head == _ZIP_MAGIC:
      return self._load_zip()
    if head[:1] != b"\x80":
      # Every torch.save pickle starts with a PROTO opcode; a tar archive with its first name.
      self._refuse_tar()
      raise _Corrupt("neither a torch.save zip archive nor a legacy torch.save file")
    return self._load_legacy()

  def _refuse_tar(self) -> None:
    self._file.seek(0)
    try:
      is_tar = tarfile.is_tarfile(self._file)
    finally:
      self._file.seek(0)
    if is_tar:
      raise CheckpointFileError(
          f"{self.path}: a tar archive, the format of PyTorch's first releases, which is not "
          "supported (torch.load(weights_only=True) refuses it too); re-save it with torch.save")

  def _load_zip(self) -> Any:
    self._zip = zipfile.ZipFile(self._file)
    names = self._zip.namelist()
    # The archive's top folder is named after the file it was first saved as: take data.pkl's.
    pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and
                                                        n.count("/") == 1)]
    if not pickles:
      raise _Corrupt("a zip archive without data.pkl: not a torch.save file")
    self._prefix = pickles[0][:-len("data.pkl")]
    byteorder = self._prefix + "byteorder"
    if byteorder in names:
      order = self._zip.read(byteorder).strip()
      if order not in (b"little", b"big"):
        raise _Corrupt(f"unknown byteorder {order[:20]!r}")
      self._big_endian = order == b"big"
    # Without a byteorder record (torch < 1.12) the file is little-endian, as torch.load assumes.
    data = self._zip.read(pickles[0])
    return _Unpickler(io.BytesIO(data), self.path, self._storages).load()

  def _load_legacy(self) -> Any:
    # The pickles are read from the map, whose read(n) stops at the end of the file: a file
    # object's read(n) would first allocate the n bytes a damaged length field asks for.
    stream = self._map if isinstance(self._map, mmap.mmap) else io.BytesIO(self._map)

    def load() -> Any:
      return _Unpickler(stream, self.path, self._storages).load()

    if load() != _LEGACY_MAGIC:
      raise _Corrupt("a pickle, but not a torch.save file (no PyTorch magic number)")
    protocol = load()
    if protocol != _LEGACY_PROTOCOL:
      raise _Corrupt(f"legacy torch.save protocol {_short(protocol)}, expected "
                     f"{_LEGACY_PROTOCOL}")
    if not isinstance(load(), dict):
      raise _Corrupt("legacy torch.save file without its system info")
    obj = load()
    keys = load()
    if not isinstance(keys, list) or not all(_text(k) for k in keys):
      raise _Corrupt("legacy torch.save file without its list of storages")
    # Each storage: int64 element count, then its elements, always little-endian.
    pos = stream.tell()
    for key in map(_text, keys):
      root = self._storages.get(key)
      if root is None:
        raise _Corrupt(f"storage {key} is listed but no tensor uses it")
      if pos + 8 > len(self._map):
        raise _Corrupt(f"storage {key} is cut off")
      (count,) = struct.unpack_from("<q", self._map, pos)
      if count * root.dtype.itemsize != root.nbytes:
        raise _Corrupt(f"storage {key} holds {count} elements, its tensors say "
                       f"{root.nbytes // root.dtype.itemsize}")
      self._offsets[key] = pos + 8
      pos += 8 + root.nbytes
      if pos > len(self._map):
        raise _Corrupt(f"storage {key} is cut off")
    missing = sorted(set(self._storages) - set(self._offsets))
    if missing:
      raise _Corrupt(f"storage {missing[0]} is used but not stored")
    return obj

  def _record(self, root: _StorageRef) -> Any:
    """The bytes of a storage record (a memory-map view where possible)."""
    if self._zip is None:
      start = self._offsets[root.key]
      return memoryview(self._map)[start:start + root.nbytes]
    name = f"{self._prefix}data/{root.key}"
    try:
      info = self._zip.getinfo(name)
    except KeyError:
      raise _Corrupt(f"storage record {name} is missing") from None
    if info.file_size != root.nbytes:
      raise _Corrupt(f"storage record {name} has {info.file_size} bytes, its tensors say "
                     f"{root.nbytes}")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
      # torch.save stores records uncompressed; a re-compressed archive is read the slow way.
      return self._zip.read(info)
    header = bytes(self._map[info.header_offset:info.header_offset + _ZIP_LOCAL_HEADER.size])
    if len(header) < _ZIP_LOCAL_HEADER.size:
      raise _Corrupt(f"storage record {name} is cut off")
    magic, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(header)
    if magic != _ZIP_MAGIC:
      raise _Corrupt(f"bad zip header of storage record {name}")
    start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > len(self._map):
      raise _Corrupt(f"storage record {name} is cut off")
    return memoryview(self._map)[start:start + info.file_size]

  def array(self, tensor: _Tensor) -> np.ndarray:
    """The tensor's values: a new, C-contiguous, native-order array.

    An expanded dimension (stride 0, as ``Tensor.expand`` makes) is copied once and broadcast:
    a read-only view, so that a small storage cannot make a huge array.

    Raises:
      CheckpointFileError: its storage is missing or cut off.
    """
    with _reading(self.path):
      ref, dtype = tensor.storage, tensor.dtype
      root = self._storages[ref.key]
      record = self._record(root)[ref.byte_offset:ref.byte_offset + ref.nbytes]
      elements = np.frombuffer(record, dtype=dtype.file_dtype(self._big_endian),
                               count=ref.nbytes // dtype.itemsize)
      compact = tuple(1 if s == 0 else n for n, s in zip(tensor.shape, tensor.strides))
      if math.prod(tensor.shape):
        # Strides in elements, as torch keeps them; bounds were checked when it was unpickled.
        stored = np.lib.stride_tricks.as_strided(
            elements[tensor.offset:], shape=compact,
            strides=[s * dtype.itemsize for s in tensor.strides], writeable=False)
      else:
        stored = np.empty(compact, elements.dtype)
      values = dtype.values(stored)
      # Drop the views of the map now, so that close() can unmap it.
      del record, elements, stored
      if tensor.negate:
        np.negative(values, out=values)
      if tensor.conjugate:
        np.conjugate(values, out=values)
      return values if compact == tensor.shape else np.broadcast_to(values, tensor.shape)

  def close(self) -> None:
    if self._zip is not None:
      self._zip.close()
    if isinstance(self._map, mmap.mmap):
      try:
        self._map.close()
      except BufferError:
        pass  # An exception's traceback still holds a view; the map goes with it.
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> _TorchFile:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _unwrap(obj: Any, path: Path) -> Mapping[Any, Any]:
  """Returns the state dict inside what the file holds."""
  if not isinstance(obj, Mapping):
    raise CheckpointFileError(f"{path}: expected a state dict, got {type(obj).__name__}")
  if not any(isinstance(v, _Tensor) for v in obj.values()):
    for key in WRAPPER_KEYS:
      if isinstance(obj.get(key), Mapping):
        return obj[key]
  return obj


def read_torch_state_dict(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (key, array) for every tensor of a PyTorch state dict file, without torch.

  Reads what ``torch.save`` writes (zip or legacy format) as ``torch.load(weights_only=True)``
  would, then turns each tensor into a NumPy array as it is yielded: float64/32/16, int64/32/16/8,
  uint64/32/16/8, bool and complex keep their dtype, bfloat16 becomes float32 (exactly). Each
  array is a C-contiguous copy, except that an expanded tensor's stride-0 dimensions are
  broadcast (read-only). A dict that holds no tensors but a ``state_dict`` or ``model`` dict is
  unwrapped. BatchNorm ``num_batches_tracked`` counters are skipped: inference does not use them.

  Raises:
    CheckpointFileError: the file is missing, truncated, corrupt, not a state dict, holds a value
      that is not a tensor, or names a pickle global other than tensors' and containers'.
  """
  path = Path(path)
  if not path.is_file():
    raise CheckpointFileError(f"{path}: no such checkpoint file")
  with _TorchFile(path) as checkpoint:
    state = _unwrap(checkpoint.obj, path)
    for key, value in state.items():
      if str(key).endswith(SKIPPED_SUFFIX):
        continue
      if not isinstance(value, _Tensor):
        raise CheckpointFileError(
            f"{path}: key {_short(key)} holds a {type(value).__name__}, not a tensor")
      yield str(key), checkpoint.array(value)


class TorchStateDict:
  """A PyTorch state dict file as a source of (key, numpy array) pairs.

  Iterating reads the file (again, each time) and yields every tensor, one array at a time, as
  ``read_torch_state_dict`` does.

  Attributes:
    path: The ``.pth`` / ``.pt`` / ``pytorch_model.bin`` file.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    yield from read_torch_state_dict(self.path)

  def __str__(self) -> str:
    return str(self.path)
