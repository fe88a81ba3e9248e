"""Tests for vlmsel_jax.scores.similarity against scipy / scikit-learn / float64 numpy references.

The scores run in float32; comparisons with float64 references use 1e-5 (CCA family, mutual
k-NN) or 1e-4 (RSA, whose float32 distances can swap the ranks of nearly equal pairs).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from scipy.spatial.distance import pdist
from sklearn.cross_decomposition import CCA
from sklearn.neighbors import NearestNeighbors

from vlmsel_jax.scores import similarity
from vlmsel_jax.scores import checks
from vlmsel_jax.scores.checks import FeatureError

TOL = 1e-5
RSA_TOL = 1e-4


def _pair(rng, n, dx, dy, offset=0.0, noise=0.5):
  x = rng.normal(size=(n, dx)) + offset
  y = np.tanh(x @ rng.normal(size=(dx, dy)) / np.sqrt(dx)) + noise * rng.normal(size=(n, dy))
  return x, y


# ----------------------------------------------------------------------------------------------
# RSA.


def ref_distances(x, distance):
  if distance == "angular":
    return np.arccos(np.clip(1.0 - pdist(x, "cosine"), -1.0, 1.0))
  return pdist(x, distance)


@pytest.mark.parametrize("distance", ["angular", "cosine", "euclidean"])
def test_rsa_matches_scipy(distance):
  x, y = _pair(np.random.default_rng(0), 80, 12, 7, offset=2.0)
  expected = scipy.stats.spearmanr(ref_distances(x, distance), ref_distances(y, distance))[0]
  assert similarity.rsa(x, y, distance=distance) == pytest.approx(expected, abs=RSA_TOL)


def test_rsa_ties_get_average_ranks():
  # Small-integer features have many exactly tied distances (here 1830 pairs, ~30 distinct
  # values); a rank without tie averaging would disagree with scipy by far more than RSA_TOL.
  rng = np.random.default_rng(1)
  x = rng.integers(-2, 3, size=(61, 3)).astype(np.float64) + 100.0
  y = np.hstack([x[:, :1], rng.integers(-1, 2, size=(61, 2))]).astype(np.float64)
  dx, dy = pdist(x), pdist(y)
  assert np.unique(dx).size < 40 and np.unique(dy).size < 40
  expected = scipy.stats.spearmanr(dx, dy)[0]
  ordinal = scipy.stats.pearsonr(scipy.stats.rankdata(dx, method="ordinal"),
                                 scipy.stats.rankdata(dy, method="ordinal"))[0]
  assert abs(ordinal - expected) > 10 * RSA_TOL  # ties do matter for this data
  assert similarity.rsa(x, y, distance="euclidean") == pytest.approx(expected, abs=RSA_TOL)


def test_rsa_closed_forms():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 5))
  for distance in ("angular", "cosine", "euclidean"):
    assert similarity.rsa(x, x, distance=distance) == pytest.approx(1.0, abs=TOL)
  # Euclidean distances scale with a similarity transform, so ranks are unchanged.
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  assert similarity.rsa(x, 4.0 * x @ q - 7.0, distance="euclidean") == pytest.approx(1.0, abs=TOL)
  # Cosine-based distances ignore each row's positive scale.
  scaled = x * rng.uniform(0.5, 3.0, size=(40, 1))
  assert similarity.rsa(x, scaled, distance="angular") == pytest.approx(1.0, abs=TOL)


def test_rsa_rejects_unknown_distance_and_equal_distances():
  x, y = _pair(np.random.default_rng(3), 10, 3, 3)
  with pytest.raises(ValueError, match="distance"):
    similarity.rsa(x, y, distance="manhattan")
  # Vertices of a regular simplex: every Euclidean distance is sqrt(2), nothing to rank.
  simplex = np.eye(10)
  with pytest.raises(FeatureError, match="x: all pairwise euclidean distances are equal"):
    similarity.rsa(simplex, y, distance="euclidean")
  with pytest.raises(FeatureError, match="y: all pairwise"):
    similarity.rsa(y, simplex, distance="euclidean")


# ----------------------------------------------------------------------------------------------
# CCA / SVCCA.


def ref_canonical_correlations(x, y):
  """Canonical correlations by whitening: singular values of Sxx^-1/2 Sxy Syy^-1/2 (float64)."""
  x = x - x.mean(0)
  y = y - y.mean(0)

  def inv_sqrt(m):
    w, v = np.linalg.eigh(m)
    return v @ np.diag(w**-0.5) @ v.T

  return np.linalg.svd(inv_sqrt(x.T @ x) @ (x.T @ y) @ inv_sqrt(y.T @ y), compute_uv=False)


def ref_pca(x, variance=None, dim=None, cap=True):
  """PCA scores keeping ``dim`` directions or the fewest reaching ``variance``, as documented."""
  xc = x - x.mean(0)
  u, s, _ = np.linalg.svd(xc, full_matrices=False)
  if dim is None:
    dim = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= variance)) + 1
  if cap:
    dim = min(dim, (x.shape[0] - 1) // 2)
  return u[:, :dim] * s[:dim]


def _spectrum_features(rng, n, scales):
  """Features whose principal variances are about ``scales**2``, in a random rotation."""
  q, _ = np.linalg.qr(rng.normal(size=(len(scales), len(scales))))
  return (rng.normal(size=(n, len(scales))) * scales) @ q + 5.0


# Variance shares of these scales: the first 5 directions hold 99.5%, the first 4 only 97.7%,
# so the 99% cut is at 5 with a wide margin and float32 vs float64 cannot disagree on it.
SCALES_X = np.array([10.0, 8, 6, 4, 2, 1, 0.1, 0.05])
SCALES_Y = np.array([9.0, 7, 5, 3, 0.3, 0.1])


@pytest.fixture(scope="module")
def spectrum_pair():
  rng = np.random.default_rng(4)
  x = _spectrum_features(rng, 400, SCALES_X)
  y = _spectrum_features(rng, 400, SCALES_Y) + 0.5 * x[:, :6]
  return x, y


def test_cca_full_rank_matches_whitening_reference(spectrum_pair):
  x, y = spectrum_pair
  expected = ref_canonical_correlations(x, y)
  assert similarity.cca(x, y, pca_variance=1.0) == pytest.approx(expected.mean(), abs=TOL)
  assert similarity.cca(x, y, pca_dim=8) == pytest.approx(expected.mean(), abs=TOL)
  assert similarity.cca(x, y, pca_dim=8, n_components=2) == pytest.approx(expected[:2].mean(),
                                                                           abs=TOL)


def test_cca_matches_sklearn():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(300, 6))
  y = x @ rng.normal(size=(6, 5)) + 1.5 * rng.normal(size=(300, 5))
  model = CCA(n_components=5, max_iter=2000, tol=1e-10).fit(x, y)
  x_scores, y_scores = model.transform(x, y)
  expected = [np.corrcoef(x_scores[:, i], y_scores[:, i])[0, 1] for i in range(5)]
  # sklearn's NIPALS iterations converge to ~1e-8 here; the float32 SVD is the looser side.
  assert similarity.cca(x, y, pca_variance=1.0) == pytest.approx(np.mean(expected), abs=TOL)


def test_cca_default_pca_matches_reference(spectrum_pair):
  x, y = spectrum_pair
  expected = ref_canonical_correlations(ref_pca(x, variance=0.99), ref_pca(y, variance=0.99))
  assert expected.size == 4  # 5 directions kept for x, 4 for y
  assert similarity.cca(x, y) == pytest.approx(expected.mean(), abs=TOL)
  expected_dim = ref_canonical_correlations(ref_pca(x, dim=3), ref_pca(y, dim=3))
  assert similarity.cca(x, y, pca_dim=3) == pytest.approx(expected_dim.mean(), abs=TOL)


def test_cca_caps_dims_so_correlations_are_not_forced_to_one():
  # n=21 samples of independent 50-d features: uncapped, both sides span the whole 20-d
  # centered sample space and every canonical correlation is 1. Capped at (n-1)//2 = 10 each,
  # the spaces meet generically only in {0}.
  rng = np.random.default_rng(6)
  x = rng.normal(size=(21, 50))
  y = rng.normal(size=(21, 50))
  uncapped = ref_canonical_correlations(ref_pca(x, dim=20, cap=False),
                                        ref_pca(y, dim=20, cap=False))
  assert uncapped.mean() == pytest.approx(1.0, abs=1e-6)
  expected = ref_canonical_correlations(ref_pca(x, variance=0.99), ref_pca(y, variance=0.99))
  assert expected.size == 10
  got = similarity.cca(x, y)
  assert got == pytest.approx(expected.mean(), abs=1e-4)  # 10-d whitening at n=21: looser
  assert got < 0.9


def test_cca_closed_forms():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(200, 8))
  a = rng.normal(size=(8, 8))  # invertible with probability 1
  assert similarity.cca(x, x @ a) == pytest.approx(1.0, abs=TOL)
  assert similarity.cca(x, x @ a, pca_variance=1.0) == pytest.approx(1.0, abs=TOL)
  assert similarity.svcca(x, x @ a) == pytest.approx(1.0, abs=TOL)


def test_cca_of_independent_features_is_small():
  # For independent Gaussians the largest canonical correlation concentrates near
  # (sqrt(dx) + sqrt(dy)) / sqrt(n) (edge of the Wachter law), here 0.045; the mean is below it.
  rng = np.random.default_rng(8)
  n, dx, dy = 20000, 10, 10
  x = rng.normal(size=(n, dx))
  y = rng.normal(size=(n, dy))
  bound = (np.sqrt(dx) + np.sqrt(dy)) / np.sqrt(n)
  assert similarity.cca(x, y, pca_variance=1.0) < bound
  assert similarity.svcca(x, y) < bound


def test_cca_invariant_to_invertible_maps_without_reduction(spectrum_pair):
  x, y = spectrum_pair
  a = np.random.default_rng(9).normal(size=(8, 8))
  assert similarity.cca(x @ a + 3.0, y, pca_variance=1.0) == pytest.approx(
      similarity.cca(x, y, pca_variance=1.0), abs=TOL)


def ref_svcca(x, y, keep):
  """SVCCA in float64: SVD-reduce each side to ``keep`` of its variance, whiten, average."""
  return ref_canonical_correlations(ref_pca(x, variance=keep), ref_pca(y, variance=keep)).mean()


@pytest.mark.parametrize("keep", [0.99, 0.9])
def test_svcca_matches_reference(spectrum_pair, keep):
  x, y = spectrum_pair
  assert similarity.svcca(x, y, keep=keep) == pytest.approx(ref_svcca(x, y, keep), abs=TOL)


def test_svcca_invariances(spectrum_pair):
  x, y = spectrum_pair
  rng = np.random.default_rng(10)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  base = similarity.svcca(x, y)
  assert similarity.svcca(0.3 * x @ q - 2.0, y) == pytest.approx(base, abs=TOL)
  assert similarity.svcca(y, x) == pytest.approx(base, abs=TOL)
  # An anisotropic stretch changes which directions hold 99% of the variance, so the score
  # moves: the invariance above is not automatic.
  stretched = x @ np.diag([0.01, 1, 1, 1, 1, 1, 30, 30]) @ q
  assert abs(similarity.svcca(stretched, y) - base) > 0.01


def test_cca_parameter_errors(spectrum_pair):
  x, y = spectrum_pair
  for kwargs in ({"pca_variance": 0.0}, {"pca_variance": 1.5}, {"pca_dim": 0},
                 {"n_components": 0}):
    with pytest.raises(ValueError):
      similarity.cca(x, y, **kwargs)
  with pytest.raises(ValueError, match="keep"):
    similarity.svcca(x, y, keep=0.0)


# ----------------------------------------------------------------------------------------------
# Mutual k-NN.


def ref_mutual_knn(x, y, k):
  def neighbours(f):
    # Without a query, kneighbors() excludes each point from its own neighbour list.
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(f)
    return nn.kneighbors(return_distance=False)

  nx, ny = neighbours(x), neighbours(y)
  return np.mean([len(set(a) & set(b)) / k for a, b in zip(nx, ny)])


@pytest.mark.parametrize("k", [1, 5, 10])
def test_mutual_knn_matches_sklearn(k):
  x, y = _pair(np.random.default_rng(11), 150, 16, 8, noise=0.3)
  assert similarity.mutual_knn(x, y, k=k) == pytest.approx(ref_mutual_knn(x, y, k), abs=TOL)


def test_mutual_knn_closed_forms():
  rng = np.random.default_rng(12)
  x = rng.normal(size=(120, 6))
  assert similarity.mutual_knn(x, x, k=10) == 1.0
  # Cosine neighbours ignore row norms and rotations.
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  assert similarity.mutual_knn(x, x @ q * rng.uniform(0.5, 2.0, size=(120, 1)), k=10) == 1.0
  # Independent features share k / (n - 1) of their neighbours in expectation (0.021 here);
  # the per-sample fraction has sd ~0.045, so the mean over 400 samples is within 0.01.
  x = rng.normal(size=(400, 6))
  y = rng.normal(size=(400, 6))
  assert similarity.mutual_knn(x, y, k=8) == pytest.approx(8 / 399, abs=0.01)


def test_mutual_knn_rejects_bad_k():
  x, y = _pair(np.random.default_rng(13), 10, 3, 3)
  for k in (0, 10, 11):
    with pytest.raises(ValueError, match="k must"):
      similarity.mutual_knn(x, y, k=k)
  assert 0.0 <= similarity.mutual_knn(x, y, k=9) <= 1.0


# ----------------------------------------------------------------------------------------------
# Input validation shared by all scores.

BAD_INPUTS = {
    "nan": lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x),
    "inf": lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.inf, x),
    "one_dimensional": lambda x: x[:, 0],
    "too_few_rows": lambda x: x[:3],
    "constant": lambda x: np.ones_like(x),
    "wrong_n": lambda x: x[:-1],
}

SCORES = {
    "rsa": similarity.rsa,
    "cca": similarity.cca,
    "svcca": similarity.svcca,
    "mutual_knn": lambda x, y: similarity.mutual_knn(x, y, k=2),
}


@pytest.mark.parametrize("score", sorted(SCORES))
@pytest.mark.parametrize("corruption", sorted(BAD_INPUTS))
def test_bad_input_raises_feature_error(score, corruption):
  x, y = _pair(np.random.default_rng(14), 12, 3, 3)
  with pytest.raises(FeatureError):
    SCORES[score](BAD_INPUTS[corruption](x), y)
  with pytest.raises(FeatureError):
    SCORES[score](x, BAD_INPUTS[corruption](y))


def test_feature_checks_do_not_depend_on_the_scale():
  """Checks run in float64: finite features far outside float32's range are named as such (not
  as NaN or as identical samples), and samples equal to float32 precision are caught."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 8))
  for factor in (1e-12, 1.0, 1e12):
    checks.check_features(x * factor, "bank.npz")
  with pytest.raises(checks.FeatureError, match=r"^bank\.npz: the largest \|value\| is .*small "
                     r"underflow .* rescale the features"):
    checks.check_features(x * 1e-25, "bank.npz")
  with pytest.raises(checks.FeatureError, match=r"^bank\.npz: the largest \|value\| is .*large "
                     r"overflow"):
    checks.check_features(x * 1e300, "bank.npz")
  near = np.ones((16, 8)) + 1e-10 * x
  with pytest.raises(checks.FeatureError, match="identical to float32 precision"):
    checks.check_features(near, "bank.npz")
  with pytest.raises(checks.FeatureError, match=r"all 16 samples are identical \(constant"):
    checks.check_features(np.ones((16, 8)) * 1e-30, "bank.npz")
