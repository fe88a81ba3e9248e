"""Transferability baselines against independent NumPy / scikit-learn references."""

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from vlmsel_jax.scores import transferability as tr


def _data(n=120, d=6, classes=3, seed=0, sep=1.5):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  centres = rng.normal(size=(classes, d)) * sep
  return centres[y] + rng.normal(size=(n, d)), y


def _logme_reference(f, y, iterations=1000, tol=1e-12):
  """LogME from the paper's formulas with explicit matrices (A, its inverse, m), not the SVD."""
  n, d = f.shape
  ftf = f.T @ f
  eig = np.linalg.eigvalsh(ftf)
  out = []
  for c in range(y.max() + 1):
    t = (y == c).astype(float)
    alpha, beta = 1.0, 1.0
    for _ in range(iterations):
      a = alpha * np.eye(d) + beta * ftf
      m = beta * np.linalg.solve(a, f.T @ t)
      gamma = np.sum(beta * eig / (alpha + beta * eig))
      new_alpha = gamma / (m @ m + 1e-5)
      new_beta = (n - gamma) / (np.sum((f @ m - t) ** 2) + 1e-5)
      done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) <= tol
      alpha, beta = new_alpha, new_beta
      if done:
        break
    a = alpha * np.eye(d) + beta * ftf
    m = beta * np.linalg.solve(a, f.T @ t)
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.linalg.slogdet(a)[1]
          - beta / 2 * np.sum((f @ m - t) ** 2) - alpha / 2 * m @ m - n / 2 * np.log(2 * np.pi))
    out.append(ev / n)
  return np.mean(out)


@pytest.mark.parametrize("shape", [(120, 6), (40, 60)], ids=["n>d", "n<d"])
def test_logme_matches_explicit_matrix_reference(shape):
  f, y = _data(*shape)
  ours = tr.logme(f, y, max_iterations=1000, tol=1e-12)
  assert ours == pytest.approx(_logme_reference(f, y), abs=1e-8)


def test_logme_default_iterations_near_the_converged_value_and_prefers_separable_features():
  f, y = _data()
  assert tr.logme(f, y) == pytest.approx(_logme_reference(f, y), abs=1e-3)
  noise = np.random.default_rng(1).normal(size=f.shape)
  assert tr.logme(f, y) > tr.logme(noise, y)


def _leep_reference(theta, y):
  """LEEP by explicit loops over samples, target labels and source labels (the paper's sums)."""
  n, z = theta.shape
  c = y.max() + 1
  joint = np.zeros((c, z))
  for i in range(n):
    joint[y[i]] += theta[i] / n
  marginal = joint.sum(axis=0)
  total = 0.0
  for i in range(n):
    total += np.log(sum(joint[y[i], k] / marginal[k] * theta[i, k] for k in range(z)))
  return total / n


def test_leep_matches_loop_reference():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(50, 7))
  theta = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  y = rng.integers(0, 4, 50)
  assert tr.leep(theta, y) == pytest.approx(_leep_reference(theta, y), abs=1e-12)


def test_leep_of_a_perfect_source_is_zero():
  y = np.array([0, 1, 2, 0, 1, 2])
  assert tr.leep(np.eye(3)[y], y) == pytest.approx(0.0, abs=1e-12)


def test_nleep_is_deterministic_by_seed():
  f, y = _data(n=90, d=8)
  a = tr.nleep(f, y, seed=3)
  assert a == tr.nleep(f, y, seed=3)
  assert np.isfinite(a) and a <= 0.0


def test_gmm_matches_sklearn_on_separated_clusters():
  rng = np.random.default_rng(4)
  centres = np.array([[0, 0], [8, 0], [0, 8]], float)
  x = np.concatenate([c + rng.normal(size=(40, 2)) for c in centres])
  ours = tr.gmm_posteriors(x, 3, seed=0)
  ref = GaussianMixture(3, random_state=0).fit(x).predict_proba(x)
  # Same partition up to a relabelling of components.
  perm = [int(np.argmax(ref[ours.argmax(1) == j].sum(0))) for j in range(3)]
  np.testing.assert_allclose(ours, ref[:, perm], atol=1e-4)


def test_pca_keeps_the_fewest_axes_reaching_the_variance():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(200, 4)) * np.array([10.0, 3.0, 1.0, 0.1])
  assert tr.pca(x, 0.8).shape == (200, 1)   # 100 / 110 of the variance on one axis.
  assert tr.pca(x, 0.95).shape == (200, 2)


def test_emms_one_hot_equals_minus_least_squares_residual():
  f, y = _data()
  onehot = np.eye(3)
  x = np.concatenate([(f - f.mean(0)) / f.std(0), np.ones((len(f), 1))], axis=1)
  target = onehot[y]
  w = np.linalg.pinv(x) @ target
  want = -np.sum((x @ w - target) ** 2) / len(f)
  assert tr.emms(f, y, [onehot]) == pytest.approx(want, abs=1e-10)
  # A second, useless embedding does not make it worse than the one-hot alone.
  noise = np.random.default_rng(6).normal(size=(3, 3))
  assert tr.emms(f, y, [onehot, noise]) >= want - 1e-9


def test_zero_shot_accuracy_by_hand():
  img = np.array([[1.0, 0.1], [0.2, 1.0], [1.0, 0.0], [0.0, -1.0]])
  txt = np.array([[1.0, 0.0], [0.0, 1.0]])
  assert tr.zero_shot_accuracy(img, txt, np.array([0, 1, 1, 1])) == pytest.approx(0.5)


def test_bad_inputs():
  with pytest.raises(ValueError, match="non-finite"):
    tr.logme(np.full((5, 2), np.nan), np.zeros(5, int))
  with pytest.raises(ValueError, match="probability distributions"):
    tr.leep(np.ones((3, 2)), np.zeros(3, int))
