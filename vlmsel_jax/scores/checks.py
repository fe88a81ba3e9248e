"""Input validation shared by every score: one clear message naming the problem.

Scores are called from binaries on user-supplied feature banks; a NaN, a wrong shape or a pair
count mismatch must stop the run with a message that says which input is wrong and how, rather
than surface later as a NaN score or an XLA shape error.
"""

from __future__ import annotations

import numpy as np

MIN_SAMPLES = 4


class FeatureError(ValueError):
  """A feature matrix that no score can be computed from."""


def check_features(x, name: str = "features", *, min_samples: int = MIN_SAMPLES) -> np.ndarray:
  """Returns ``x`` as a float 2-D numpy array, or raises ``FeatureError`` naming ``name``.

  Checks: 2-D, at least ``min_samples`` rows and one column, all values finite, not all rows equal.
  """
  arr = np.asarray(x)
  if arr.ndim != 2:
    raise FeatureError(f"{name}: expected a 2-D array (n samples x d features), got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
    raise FeatureError(f"{name}: expected real numbers, got dtype {arr.dtype}")
  n, d = arr.shape
  if n < min_samples:
    raise FeatureError(f"{name}: needs at least {min_samples} samples, got {n}")
  if d < 1:
    raise FeatureError(f"{name}: has zero feature columns")
  finite = np.isfinite(arr)
  if not finite.all():
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    kind = "NaN" if np.isnan(arr).any() else "Inf"
    raise FeatureError(
        f"{name}: {kind} values in {bad_rows.size} of {n} rows (first at row {int(bad_rows[0])})")
  if np.all(arr == arr[:1]):
    raise FeatureError(f"{name}: all {n} samples are identical (constant features), "
                       "so every pairwise distance is zero")
  return arr.astype(np.float32) if arr.dtype != np.float64 else arr


def check_pair(x, y, x_name: str = "x", y_name: str = "y", *, min_samples: int = MIN_SAMPLES):
  """Checks two paired feature matrices: each valid, and the same number of samples."""
  x = check_features(x, x_name, min_samples=min_samples)
  y = check_features(y, y_name, min_samples=min_samples)
  if x.shape[0] != y.shape[0]:
    raise FeatureError(f"{x_name} has {x.shape[0]} samples but {y_name} has {y.shape[0]}; "
                       "scores need the same paired samples in both")
  return x, y
