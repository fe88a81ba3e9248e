"""Feature banks on disk: an n × d feature matrix, the n sample ids, and metadata.

A bank is what the extractor writes and the score binary reads: row i holds the features of
sample ``ids[i]``. Two formats:
  * ``.safetensors``: tensor ``features`` (n × d), tensor ``ids`` (integer ids) or metadata key
    ``ids`` (a JSON list, for string ids); other metadata keys are kept as strings.
  * ``.npz``: arrays ``features`` and ``ids`` (integers or strings); other arrays are ignored.
Writes are atomic (temporary file + rename), so a killed run never leaves a bank that looks whole.
A bank's path may be local or a bucket URI (``gs://``; see ``vlmsel_jax.runtime.atomic``).

Every bank written records a content checksum (``content_sha256``: safetensors metadata, or an
``.npz`` array of that name): the sha256 of the features' dtype, shape and little-endian bytes
and of the ids (``content_checksum``). Reading a bank checks it, so bytes changed after the write
(a flipped bit, a disk error, a stray edit of the same size) are a BankError naming the file, not
features served as if whole. Banks written without one (older ones, or another tool's) are read
unverified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from vlmsel_jax.runtime import atomic


CHECKSUM_KEY = "content_sha256"
# Rows hashed at a time when a bank is checked without reading it whole (``check_bank``).
_CHUNK_BYTES = 64 << 20


class BankError(ValueError):
  """A feature bank file that cannot be used; the message names the file."""


@dataclasses.dataclass
class FeatureBank:
  features: np.ndarray
  ids: np.ndarray
  metadata: dict[str, str] = dataclasses.field(default_factory=dict)
  path: str = ""

  @property
  def name(self) -> str:
    return self.metadata.get("name") or os.path.splitext(os.path.basename(self.path))[0]


def _normalize_ids(ids: Any, n: int, path: str) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] != n:
    raise BankError(f"{path}: 'ids' must be a 1-D array of {n} ids (one per feature row), "
                    f"got shape {ids.shape}")
  if ids.dtype.kind not in "iuU":
    if ids.dtype.kind == "O":
      ids = ids.astype(str)
    else:
      raise BankError(f"{path}: 'ids' must be integers or strings, got dtype {ids.dtype}")
  if len(np.unique(ids)) != n:
    raise BankError(f"{path}: 'ids' has duplicates; every row needs its own sample id")
  return ids


def _ids_bytes(ids: Any) -> bytes:
  """The ids as the checksum sees them: int64 little-endian, or a JSON list of strings."""
  ids = np.asarray(ids)
  if ids.dtype.kind in "iu":
    return b"int64:" + ids.astype("<i8").tobytes()
  if ids.dtype.kind in "UO":
    return b"str:" + json.dumps([str(v) for v in ids.tolist()]).encode()
  return b"raw:" + ids.tobytes()  # Never written by save_bank: fails the check.


def _checksum_start(dtype: np.dtype, shape: tuple[int, ...], ids: Any) -> Any:
  """A sha256 that has taken in everything but the features' bytes."""
  h = hashlib.sha256()
  h.update(json.dumps({"dtype": np.dtype(dtype).name, "shape": [int(v) for v in shape]}).encode())
  h.update(_ids_bytes(ids))
  return h


def _little_endian(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def content_checksum(features: np.ndarray, ids: Any) -> str:
  """The checksum a bank of ``features`` and ``ids`` records (hex sha256)."""
  features = np.asarray(features)
  h = _checksum_start(features.dtype, features.shape, ids)
  h.update(_little_endian(features).reshape(-1).view(np.uint8))
  return h.hexdigest()


def _mismatch(path: str, recorded: str, actual: str) -> BankError:
  return BankError(f"{path}: checksum mismatch: the file changed after it was written (content "
                   f"sha256 {actual[:12]}..., recorded {recorded[:12]}...); write or extract it "
                   "again")


def _verify(path: str, recorded: str | None, features: np.ndarray, ids: Any) -> None:
  if recorded is None:
    return  # Written before banks recorded checksums: unverified.
  actual = content_checksum(features, ids)
  if actual != recorded:
    raise _mismatch(path, recorded, actual)


def check_bank(path: str) -> tuple[dict[str, str], tuple[int, ...]]:
  """(metadata, features shape) of a local bank, its checksum checked without holding it whole.

  A ``.safetensors`` bank's features are hashed a slice of rows at a time; an ``.npz`` bank is
  read (``load_bank``). Raises BankError naming ``path`` for a bank that cannot be read or whose
  content does not match its checksum; a bank with no checksum passes unverified.
  """
  if os.path.splitext(path)[1].lower() != ".safetensors":
    bank = load_bank(path)
    return bank.metadata, tuple(bank.features.shape)
  try:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(path, framework="numpy") as f:
      metadata = dict(f.metadata() or {})
      keys = set(f.keys())
      if "features" not in keys:
        found = ", ".join(sorted(keys)) or "none"
        raise BankError(f"{path}: no 'features' tensor (found: {found})")
      sliced = f.get_slice("features")
      shape = tuple(int(v) for v in sliced.get_shape())
      recorded = metadata.get(CHECKSUM_KEY)
      if recorded is not None:
        if "ids" in keys:
          ids = f.get_tensor("ids")
        elif "ids" in metadata:
          ids = np.asarray(json.loads(metadata["ids"]))
        else:
          raise BankError(f"{path}: no 'ids' (sample ids are needed to pair rows across banks)")
        if len(shape) != 2 or not shape[0]:  # Nothing to slice by rows: read it whole.
          _verify(path, recorded, f.get_tensor("features"), ids)
        else:
          first = sliced[0:1]
          h = _checksum_start(first.dtype, shape, ids)
          step = max(1, _CHUNK_BYTES // max(1, first.nbytes))
          for start in range(0, shape[0], step):
            rows = sliced[start:min(start + step, shape[0])]  # Slices do not clamp.
            h.update(_little_endian(rows).reshape(-1).view(np.uint8))
          if h.hexdigest() != recorded:
            raise _mismatch(path, recorded, h.hexdigest())
  except BankError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BankError(f"{path}: cannot read feature bank ({type(e).__name__}: {e})") from None
  return metadata, shape


def load_bank(path: str) -> FeatureBank:
  """Reads a bank; raises BankError naming ``path`` for anything missing or malformed."""
  if not atomic.exists(path):
    raise BankError(f"{path}: feature bank file not found")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".safetensors", ".npz"):
    raise BankError(f"{path}: unsupported feature bank format {ext!r}; use .safetensors or .npz")
  try:
    # safetensors opens files by name only: a remote bank is read from a local copy.
    with atomic.local_copy(path) as local:
      return _load_local(path, local, ext)
  except BankError:
    raise
  # The download's errors (_load_local turns a bad file's into BankErrors).
  except Exception as e:  # pylint: disable=broad-except
    raise BankError(f"{path}: cannot read feature bank ({type(e).__name__}: {e})") from None


def _load_local(path: str, local: str, ext: str) -> FeatureBank:
  """``load_bank`` of the local file ``local`` holding ``path`` (the name errors give)."""
  metadata: dict[str, str] = {}
  recorded = None
  try:
    if ext == ".safetensors":
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      with safe_open(local, framework="numpy") as f:
        keys = set(f.keys())
        metadata = dict(f.metadata() or {})
        if "features" not in keys:
          raise BankError(f"{path}: no 'features' tensor (found: {', '.join(sorted(keys)) or 'none'})")
        features = f.get_tensor("features")
        if "ids" in keys:
          ids = f.get_tensor("ids")
        elif "ids" in metadata:
          ids = np.asarray(json.loads(metadata.pop("ids")))
        else:
          ids = None
        recorded = metadata.get(CHECKSUM_KEY)
    else:  # .npz
      with np.load(local, allow_pickle=False) as f:
        if "features" not in f.files:
          raise BankError(f"{path}: no 'features' array (found: {', '.join(f.files) or 'none'})")
        features = f["features"]
        ids = f["ids"] if "ids" in f.files else None
        if CHECKSUM_KEY in f.files:
          recorded = str(f[CHECKSUM_KEY])
  except BankError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BankError(f"{path}: cannot read feature bank ({type(e).__name__}: {e})") from None
  features = np.asarray(features)
  if features.ndim != 2:
    raise BankError(f"{path}: 'features' must be 2-D (n samples x d), got shape {features.shape}")
  if ids is None:
    raise BankError(f"{path}: no 'ids' (sample ids are needed to pair rows across banks)")
  # Before the ids are judged: a flipped byte there is reported as what it is.
  _verify(path, recorded, features, ids)
  ids = _normalize_ids(ids, features.shape[0], path)
  return FeatureBank(features=features, ids=ids, metadata=metadata, path=path)


def save_bank(path: str, features: np.ndarray, ids, metadata: Mapping[str, Any] | None = None):
  """Writes a bank atomically in the format given by ``path``'s extension, with its checksum."""
  features = np.ascontiguousarray(features)
  ids = _normalize_ids(ids, features.shape[0], path)
  meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
  checksum = content_checksum(features, ids)
  meta[CHECKSUM_KEY] = checksum
  ext = os.path.splitext(path)[1].lower()

  def write(tmp: str) -> None:
    if ext == ".safetensors":
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      tensors = {"features": features}
      if ids.dtype.kind == "U":
        meta["ids"] = json.dumps(ids.tolist())
      else:
        tensors["ids"] = ids.astype(np.int64)
      save_file(tensors, tmp, metadata=meta)
    elif ext == ".npz":
      with open(tmp, "wb") as f:
        np.savez(f, features=features, ids=ids, **{CHECKSUM_KEY: np.asarray(checksum)})
    else:
      raise BankError(f"{path}: unsupported feature bank format {ext!r}; use .safetensors or .npz")

  atomic.write_atomic(path, write, prefix=".tmp-")


def align_to(bank: FeatureBank, reference_ids: np.ndarray, reference_path: str) -> np.ndarray:
  """``bank.features`` reordered so row i pairs with ``reference_ids[i]``.

  Raises BankError when the two banks do not hold the same samples.
  """
  ids = bank.ids
  if ids.dtype.kind != reference_ids.dtype.kind and not (
      ids.dtype.kind in "iu" and reference_ids.dtype.kind in "iu"):
    raise BankError(f"{bank.path}: ids are {ids.dtype} but {reference_path} has "
                    f"{reference_ids.dtype} ids; pair ids must be of one kind")
  if ids.shape == reference_ids.shape and np.array_equal(ids, reference_ids):
    return bank.features
  index = {v: i for i, v in enumerate(ids.tolist())}
  missing = [v for v in reference_ids.tolist() if v not in index]
  extra = len(ids) - (len(reference_ids) - len(missing))
  if missing or extra:
    example = f" (e.g. id {missing[0]!r} is missing)" if missing else ""
    raise BankError(f"{bank.path}: pair ids do not match {reference_path}: {len(missing)} of "
                    f"{len(reference_ids)} ids missing, {extra} extra{example}")
  return bank.features[[index[v] for v in reference_ids.tolist()]]
