"""Feature banks on disk: an n × d feature matrix, the n sample ids, and metadata.

A bank is what the extractor writes and the score binary reads: row i holds the features of
sample ``ids[i]``. Two formats:
  * ``.safetensors``: tensor ``features`` (n × d), tensor ``ids`` (integer ids) or metadata key
    ``ids`` (a JSON list, for string ids); other metadata keys are kept as strings.
  * ``.npz``: arrays ``features`` and ``ids`` (integers or strings); other arrays are ignored.
Writes are atomic (temporary file + rename), so a killed run never leaves a bank that looks whole.
A bank's path may be local or a bucket URI (``gs://``; see ``vlmsel_jax.runtime.atomic``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from vlmsel_jax.runtime import atomic


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
    else:  # .npz
      with np.load(local, allow_pickle=False) as f:
        if "features" not in f.files:
          raise BankError(f"{path}: no 'features' array (found: {', '.join(f.files) or 'none'})")
        features = f["features"]
        ids = f["ids"] if "ids" in f.files else None
  except BankError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BankError(f"{path}: cannot read feature bank ({type(e).__name__}: {e})") from None
  features = np.asarray(features)
  if features.ndim != 2:
    raise BankError(f"{path}: 'features' must be 2-D (n samples x d), got shape {features.shape}")
  if ids is None:
    raise BankError(f"{path}: no 'ids' (sample ids are needed to pair rows across banks)")
  ids = _normalize_ids(ids, features.shape[0], path)
  return FeatureBank(features=features, ids=ids, metadata=metadata, path=path)


def save_bank(path: str, features: np.ndarray, ids, metadata: Mapping[str, Any] | None = None):
  """Writes a bank atomically in the format given by ``path``'s extension."""
  features = np.ascontiguousarray(features)
  ids = _normalize_ids(ids, features.shape[0], path)
  meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
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
        np.savez(f, features=features, ids=ids)
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
