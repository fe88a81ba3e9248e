"""Tests for vlmsel_jax.scores.cka against an independent float64 numpy implementation.

The reference functions below transcribe the gram-matrix formulas of the Kornblith et al.
reference code (google-research/representation_similarity: ``gram_linear``, ``gram_rbf``,
``center_gram``, ``cka``). The JAX code runs in float32, hence the 1e-5 tolerances against them.
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmsel_jax.scores import cka
from vlmsel_jax.scores.checks import FeatureError

# float32 cores vs float64 references on O(1) scores.
TOL = 1e-5


def ref_gram_linear(x):
  return x @ x.T


def ref_gram_rbf(x, threshold=1.0):
  dot_products = x @ x.T
  sq_norms = np.diag(dot_products)
  sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
  sq_median_distance = np.median(sq_distances)
  return np.exp(-sq_distances / (2 * threshold**2 * sq_median_distance))


def ref_center_gram(gram, unbiased=False):
  gram = gram.astype(np.float64, copy=True)
  if unbiased:
    n = gram.shape[0]
    np.fill_diagonal(gram, 0)
    means = np.sum(gram, 0) / (n - 2)
    means -= np.sum(means) / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    np.fill_diagonal(gram, 0)
  else:
    means = np.mean(gram, 0)
    means -= np.mean(means) / 2
    gram -= means[:, None]
    gram -= means[None, :]
  return gram


def ref_cka(gram_x, gram_y, debiased=False):
  gram_x = ref_center_gram(gram_x, unbiased=debiased)
  gram_y = ref_center_gram(gram_y, unbiased=debiased)
  scaled_hsic = gram_x.ravel() @ gram_y.ravel()
  return scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))


def ref_song_hsic(k, l):
  """Unbiased HSIC_1 of Song et al. (2012), written directly from the paper's formula."""
  n = k.shape[0]
  k = k.copy()
  l = l.copy()
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  ones = np.ones(n)
  return (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))


@pytest.fixture(scope="module")
def reference_pair():
  np.random.seed(1337)
  x = np.random.randn(100, 10)
  y = np.random.randn(100, 10) + x
  return x, y


def test_published_reference_values(reference_pair):
  x, y = reference_pair
  assert cka.linear_cka(x, y) == pytest.approx(0.55761, abs=1e-4)
  assert cka.rbf_cka(x, y, sigma=0.5) == pytest.approx(0.65483, abs=1e-4)
  assert cka.debiased_linear_cka(x, y) == pytest.approx(0.51346, abs=1e-4)


def test_numpy_reference_reproduces_published_values(reference_pair):
  # Guards the test's own reference implementation, which the comparisons below rely on.
  x, y = reference_pair
  assert ref_cka(ref_gram_linear(x), ref_gram_linear(y)) == pytest.approx(0.55761, abs=1e-4)
  assert ref_cka(ref_gram_rbf(x, 0.5), ref_gram_rbf(y, 0.5)) == pytest.approx(0.65483, abs=1e-4)
  assert ref_cka(ref_gram_linear(x), ref_gram_linear(y), debiased=True) == pytest.approx(
      0.51346, abs=1e-4)


# (n, dx, dy): the first two use the d x d feature form, the last the n x n Gram form (n < d).
SHAPES = [(60, 7, 5), (50, 12, 12), (12, 40, 30)]


def _pair(rng, n, dx, dy, offset=0.0):
  x = rng.normal(size=(n, dx)) + offset
  y = np.tanh(x @ rng.normal(size=(dx, dy))) + 0.5 * rng.normal(size=(n, dy)) - offset
  return x, y


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_reference(shape):
  x, y = _pair(np.random.default_rng(0), *shape, offset=3.0)
  expected = ref_cka(ref_gram_linear(x), ref_gram_linear(y))
  assert cka.linear_cka(x, y) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_debiased_matches_reference(shape):
  x, y = _pair(np.random.default_rng(1), *shape, offset=3.0)
  expected = ref_cka(ref_gram_linear(x), ref_gram_linear(y), debiased=True)
  assert cka.debiased_linear_cka(x, y) == pytest.approx(expected, abs=TOL)


def test_debiased_equals_song_u_statistic():
  # The U-centering of the reference code and the Song et al. formula are the same estimator.
  x, y = _pair(np.random.default_rng(2), 30, 6, 4)
  k, l = ref_gram_linear(x), ref_gram_linear(y)
  expected = ref_song_hsic(k, l) / np.sqrt(ref_song_hsic(k, k) * ref_song_hsic(l, l))
  assert cka.debiased_linear_cka(x, y) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("sigma", [0.2, 0.5, 2.0])
def test_rbf_matches_reference(sigma):
  x, y = _pair(np.random.default_rng(3), 40, 6, 9, offset=2.0)
  expected = ref_cka(ref_gram_rbf(x, sigma), ref_gram_rbf(y, sigma))
  assert cka.rbf_cka(x, y, sigma=sigma) == pytest.approx(expected, abs=TOL)


def test_debiased_is_smaller_than_biased_for_unrelated_wide_features():
  # Biased linear CKA of independent features grows with d/n; the debiased one stays near 0.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(40, 100))
  y = rng.normal(size=(40, 100))
  assert cka.linear_cka(x, y) > 0.5
  assert abs(cka.debiased_linear_cka(x, y)) < 0.05


ALL_CKAS = [cka.linear_cka, cka.rbf_cka, cka.debiased_linear_cka]


@pytest.mark.parametrize("score", ALL_CKAS)
def test_self_similarity_is_one_and_symmetric(score):
  x, y = _pair(np.random.default_rng(5), 50, 8, 6)
  assert score(x, x) == pytest.approx(1.0, abs=TOL)
  assert score(x, y) == pytest.approx(score(y, x), abs=TOL)


@pytest.mark.parametrize("score", ALL_CKAS)
def test_invariant_to_orthogonal_transform_scaling_and_translation(score):
  rng = np.random.default_rng(6)
  x, y = _pair(rng, 50, 8, 6)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  moved = 3.7 * x @ q + rng.normal(size=(1, 8))
  assert score(moved, y) == pytest.approx(score(x, y), abs=TOL)


def test_linear_cka_not_invariant_to_anisotropic_scaling():
  # Sanity check that the invariance test above can fail: CKA is not invariant to any
  # invertible linear map (unlike CCA).
  rng = np.random.default_rng(7)
  x, y = _pair(rng, 50, 8, 6)
  stretched = x * np.array([10.0, 1, 1, 1, 1, 1, 1, 0.1])
  assert abs(cka.linear_cka(stretched, y) - cka.linear_cka(x, y)) > 0.01


def test_minibatch_single_batch_equals_debiased():
  x, y = _pair(np.random.default_rng(8), 64, 10, 7, offset=1.0)
  expected = cka.debiased_linear_cka(x, y)
  assert cka.minibatch_cka(x, y, batch_size=64) == pytest.approx(expected, abs=TOL)
  acc = cka.MinibatchCKA().update(x, y)
  assert acc.result() == pytest.approx(expected, abs=TOL)


def test_minibatch_accumulates_song_estimates():
  rng = np.random.default_rng(9)
  x, y = _pair(rng, 30, 5, 4)
  batches = [slice(0, 10), slice(10, 22), slice(22, 30)]  # uneven sizes on purpose
  acc = cka.MinibatchCKA()
  sums = np.zeros(3)
  for rows in batches:
    acc = acc.update(x[rows], y[rows])
    xb = x[rows] - x[rows].mean(0)
    yb = y[rows] - y[rows].mean(0)
    k, l = ref_gram_linear(xb), ref_gram_linear(yb)
    sums += [ref_song_hsic(k, l), ref_song_hsic(k, k), ref_song_hsic(l, l)]
  assert int(acc.num_batches) == 3
  np.testing.assert_allclose([float(acc.hsic_xy), float(acc.hsic_xx), float(acc.hsic_yy)],
                             sums, rtol=1e-5)
  assert acc.result() == pytest.approx(sums[0] / np.sqrt(sums[1] * sums[2]), abs=TOL)


def test_minibatch_update_is_immutable():
  x, y = _pair(np.random.default_rng(10), 16, 4, 4)
  empty = cka.MinibatchCKA()
  one = empty.update(x[:8], y[:8])
  two = one.update(x[8:], y[8:])
  assert empty.num_batches == 0 and float(empty.hsic_xy) == 0.0
  assert int(one.num_batches) == 1 and int(two.num_batches) == 2
  assert float(one.hsic_xx) != float(two.hsic_xx)
  with pytest.raises(ValueError, match="before any update"):
    empty.result()


def test_minibatch_cka_equals_manual_stream_with_same_shuffle():
  x, y = _pair(np.random.default_rng(11), 50, 6, 5)
  order = np.random.default_rng(3).permutation(50)
  acc = cka.MinibatchCKA()
  # 50 = 4 * 12 + 2: four full batches, the 2-row remainder is dropped.
  for start in range(0, 48, 12):
    rows = order[start:start + 12]
    acc = acc.update(x[rows], y[rows])
  assert cka.minibatch_cka(x, y, batch_size=12, seed=3) == pytest.approx(acc.result(), abs=TOL)
  # 50 = 3 * 15 + 5: the 5-row remainder is kept as a fourth batch.
  acc = cka.MinibatchCKA()
  for start in range(0, 50, 15):
    rows = order[start:start + 15]
    acc = acc.update(x[rows], y[rows])
  assert int(acc.num_batches) == 4
  assert cka.minibatch_cka(x, y, batch_size=15, seed=3) == pytest.approx(acc.result(), abs=TOL)


def test_minibatch_converges_to_population_cka():
  # X ~ N(0, I), Y = X A + s E: population linear CKA is ||A||_F^2 / (||I||_F ||A^T A + s^2 I||_F).
  rng = np.random.default_rng(12)
  n, d = 16384, 16
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  x = rng.normal(size=(n, d))
  y = x @ a + 0.8 * rng.normal(size=(n, d))
  population = np.sum(a**2) / (np.sqrt(d) * np.linalg.norm(a.T @ a + 0.64 * np.eye(d)))
  debiased = cka.debiased_linear_cka(x, y)
  streamed = cka.minibatch_cka(x, y, batch_size=256, seed=0)
  # 64 batches of 256: both estimators have sampling error of order 1/sqrt(n); with these
  # sizes they land within 0.01 of the population value and of each other.
  assert debiased == pytest.approx(population, abs=0.01)
  assert streamed == pytest.approx(debiased, abs=0.01)
  # With d/n this small the bias of plain linear CKA is negligible, so it agrees as well.
  assert cka.linear_cka(x, y) == pytest.approx(population, abs=0.01)


BAD_INPUTS = {
    "nan": lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x),
    "one_dimensional": lambda x: x[:, 0],
    "too_few_rows": lambda x: x[:3],
    "constant": lambda x: np.ones_like(x),
    "wrong_n": lambda x: x[:-1],
}


@pytest.mark.parametrize("score", ALL_CKAS + [lambda x, y: cka.minibatch_cka(x, y, 4)])
@pytest.mark.parametrize("corruption", sorted(BAD_INPUTS))
def test_bad_input_raises_feature_error(score, corruption):
  x, y = _pair(np.random.default_rng(13), 12, 3, 3)
  with pytest.raises(FeatureError):
    score(BAD_INPUTS[corruption](x), y)
  with pytest.raises(FeatureError):
    score(x, BAD_INPUTS[corruption](y))


def test_minibatch_rejects_small_batches():
  x, y = _pair(np.random.default_rng(14), 12, 3, 3)
  with pytest.raises(FeatureError, match="at least 4"):
    cka.MinibatchCKA().update(x[:3], y[:3])
  with pytest.raises(ValueError, match="batch_size"):
    cka.minibatch_cka(x, y, batch_size=3)
  with pytest.raises(ValueError, match="batch_size"):
    cka.minibatch_cka(x, y, batch_size=13)


def test_rbf_rejects_degenerate_bandwidth():
  rng = np.random.default_rng(15)
  x = np.zeros((10, 3))
  x[0] = 1.0  # 81 of 100 pairwise distances are zero
  with pytest.raises(FeatureError, match="median"):
    cka.rbf_cka(x, rng.normal(size=(10, 3)))
  with pytest.raises(ValueError, match="sigma"):
    cka.rbf_cka(rng.normal(size=(10, 3)), rng.normal(size=(10, 3)), sigma=0.0)
