"""Input validation shared by every score: one clear message naming the problem.

Scores are called from binaries on user-supplied feature banks; a NaN, a wrong shape or a pair
count mismatch must stop the run with a message that says which input is wrong and how, rather
than surface later as a NaN score or an XLA shape error.
"""

from __future__ import annotations

import numpy as np

MIN_SAMPLES = 4
# The magnitudes a feature matrix may have: squares and sums of squares of values in this range
# stay normal float32 numbers (float32 spans about 1.2e-38 to 3.4e38) for any realistic width.
SMALLEST, LARGEST = 1e-15, 1e15


class FeatureError(ValueError):
  """A feature matrix that no score can be computed from."""


def check_features(x, name: str = "features", *, min_samples: int = MIN_SAMPLES) -> np.ndarray:
  """Returns ``x`` as a float 2-D numpy array, or raises ``FeatureError`` naming ``name``.

  Checks: 2-D, at least ``min_samples`` rows and one column, all values finite, magnitudes
  float32 can square, not all rows equal (to float32 precision). The checks run in float64.
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
  # In float64, whatever the input's dtype, so that the checks do not depend on the scale.
  wide = arr.astype(np.float64)
  peak = float(np.max(np.abs(wide)))
  spread = float(np.max(np.abs(wide - wide[:1])))
  if spread == 0.0:
    raise FeatureError(f"{name}: all {n} samples are identical (constant features), "
                       "so every pairwise distance is zero")
  if not SMALLEST <= peak <= LARGEST:
    raise FeatureError(
        f"{name}: the largest |value| is {peak:.3g}; the scores compute in float32, where "
        f"squared distances of values this {'small underflow' if peak < SMALLEST else 'large overflow'}"
        " — rescale the features (e.g. divide by their standard deviation)")
  if spread <= 4 * np.finfo(np.float32).eps * peak:
    raise FeatureError(f"{name}: all {n} samples are identical to float32 precision (they "
                       f"differ by at most {spread:.3g} at magnitude {peak:.3g}), so every "
                       "pairwise distance is zero")
  return arr.astype(np.float32) if arr.dtype != np.float64 else arr


def check_pair(x, y, x_name: str = "x", y_name: str = "y", *, min_samples: int = MIN_SAMPLES):
  """Checks two paired feature matrices: each valid, and the same number of samples."""
  x = check_features(x, x_name, min_samples=min_samples)
  y = check_features(y, y_name, min_samples=min_samples)
  if x.shape[0] != y.shape[0]:
    raise FeatureError(f"{x_name} has {x.shape[0]} samples but {y_name} has {y.shape[0]}; "
                       "scores need the same paired samples in both")
  return x, y
