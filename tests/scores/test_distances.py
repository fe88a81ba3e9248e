"""Pairwise distances and scale alignment against SciPy."""

import numpy as np
import pytest
from scipy.spatial import distance as sp_distance

from vlmsel_jax.scores import distances


@pytest.fixture(name="x")
def _x():
  return np.random.default_rng(0).standard_normal((40, 7)).astype(np.float32)


def test_cosine_and_euclidean_match_scipy(x):
  for ours, theirs in (("cosine", "cosine"), ("euclidean", "euclidean")):
    got = np.asarray(distances.pairwise_distances(x, ours))
    want = sp_distance.squareform(sp_distance.pdist(x.astype(np.float64), theirs))
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=ours)


def test_angular_is_arccos_of_cosine_similarity(x):
  got = np.asarray(distances.pairwise_distances(x, "angular"))
  cos = 1.0 - sp_distance.squareform(sp_distance.pdist(x.astype(np.float64), "cosine"))
  want = np.arccos(np.clip(cos, -1, 1))
  np.fill_diagonal(want, 0.0)
  # arccos is steep near ±1: float32 round-off in cos becomes ~1e-3 rad for near-parallel rows.
  np.testing.assert_allclose(got, want, atol=5e-4)
  assert np.all(np.diag(got) == 0.0)
  assert got.max() <= np.pi + 1e-6


def test_angular_of_antipodal_and_orthogonal_rows():
  x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -3.0]], np.float32)
  d = np.asarray(distances.pairwise_distances(x, "angular"))
  np.testing.assert_allclose(d[0, 1], np.pi, atol=1e-6)
  np.testing.assert_allclose(d[0, 2], np.pi / 2, atol=1e-6)
  np.testing.assert_allclose(d[2, 3], np.pi, atol=1e-6)


def test_median_alignment_matches_definition(x):
  y = 5.0 * np.random.default_rng(1).standard_normal((40, 3)).astype(np.float32)
  dx = distances.pairwise_distances(x, "euclidean")
  dy = distances.pairwise_distances(y, "euclidean")
  sx, sy, s = distances.align_scale(dx, dy, "median")
  iu = np.triu_indices(40, 1)
  want = np.median(np.asarray(dy)[iu]) / np.median(np.asarray(dx)[iu])
  np.testing.assert_allclose(float(s), want, rtol=1e-6)
  np.testing.assert_allclose(np.median(np.asarray(sx)[iu]), np.median(np.asarray(sy)[iu]), rtol=1e-5)


def test_unknown_names_raise(x):
  with pytest.raises(ValueError, match="unknown distance 'manhattan'"):
    distances.pairwise_distances(x, "manhattan")
  d = distances.pairwise_distances(x)
  with pytest.raises(ValueError, match="unknown scale 'mean'"):
    distances.align_scale(d, d, "mean")
