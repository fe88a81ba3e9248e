"""Transferability baselines: LogME, LEEP, NLEEP, EMMS, model size, zero-shot accuracy.

Each estimates, without fine-tuning, how well a pretrained model's features (or predictions)
will transfer to a labelled target task; larger is better for every score here. NumPy, float64.

* ``logme`` (You et al., 2021): the log marginal likelihood (evidence) of Bayesian linear
  regression from features to each one-hot label column, maximized over the prior precision α
  and noise precision β by the fixed-point iteration of the thuml reference (γ = Σ βσ/(α+βσ),
  α ← γ / mᵀm, β ← (N − γ) / ‖Fm − y‖²) in the eigenbasis of FᵀF; mean over classes, ÷ N.
* ``leep`` (Nguyen et al., 2020): with source-label probabilities θ(x) and target labels y,
  LEEP = (1/n) Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z, P̂(y | z) from the empirical joint.
* ``nleep`` (Li et al., 2021): LEEP with θ replaced by the posteriors of a Gaussian mixture
  (5·C components, full covariances, k-means++ then EM) fitted to the features after PCA to
  80% of the variance; seeded.
* ``emms`` (Meng et al., 2023): regress a convex combination of several label embeddings on
  the features, alternating least squares for the regression weights with non-negative least
  squares (normalized to the simplex) for the combination; score = −mean squared residual.
* ``parameter_count`` (model size) and ``zero_shot_accuracy`` (nearest class text embedding by
  cosine) are the two trivial baselines reported beside them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special

_EPS = 1e-5  # The thuml reference's guard in the α and β updates.


def _check(features, labels, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
  f = np.asarray(features, np.float64)
  y = np.asarray(labels)
  if f.ndim != 2:
    raise ValueError(f"{name}: expected (n, d), got shape {f.shape}")
  if y.ndim != 1 or y.shape[0] != f.shape[0]:
    raise ValueError(f"labels: expected ({f.shape[0]},) integer labels, got shape {y.shape}")
  if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
    raise ValueError("labels: expected non-negative integer class indices")
  if not np.all(np.isfinite(f)):
    raise ValueError(f"{name}: non-finite values")
  if f.shape[0] < 2:
    raise ValueError(f"{name}: needs at least 2 samples, got {f.shape[0]}")
  return f, y.astype(np.int64)


def logme(features, labels, *, max_iterations: int = 11, tol: float = 1e-3) -> float:
  """LogME: mean over classes of the maximized evidence per sample.

  Args:
    features: (n, d) features.
    labels: (n,) integer class labels 0..C−1.
    max_iterations, tol: the fixed point stops when α/β changes by ≤ ``tol`` relatively, or
      after ``max_iterations`` updates (the thuml reference: 11, 1e-3).
  """
  f, y = _check(features, labels)
  n, d = f.shape
  u, s, _ = np.linalg.svd(f, full_matrices=False)
  sigma = s ** 2  # Eigenvalues of FᵀF; the other d − k are 0.
  k = sigma.size
  evidences = []
  for c in range(int(y.max()) + 1):
    t = (y == c).astype(np.float64)
    x2 = (u.T @ t) ** 2
    outside = float(t @ t - x2.sum())  # ‖t‖² outside the column space of F.
    alpha, beta = 1.0, 1.0
    for _ in range(max_iterations):
      lam = alpha / beta
      gamma = float((sigma / (sigma + lam)).sum())
      m2 = float((sigma * x2 / (sigma + lam) ** 2).sum())      # mᵀm
      res2 = float((x2 * (lam / (sigma + lam)) ** 2).sum()) + outside  # ‖Fm − t‖²
      alpha = gamma / (m2 + _EPS)
      beta = (n - gamma) / (res2 + _EPS)
      if abs(alpha / beta - lam) / lam <= tol:
        break
    lam = alpha / beta
    m2 = float((sigma * x2 / (sigma + lam) ** 2).sum())
    res2 = float((x2 * (lam / (sigma + lam)) ** 2).sum()) + outside
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - k) * np.log(alpha)
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * log_det
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
    evidences.append(evidence / n)
  return float(np.mean(evidences))


def leep(source_probabilities, labels) -> float:
  """LEEP of source-label probabilities θ (n, Z; rows sum to 1) for target ``labels``."""
  theta, y = _check(source_probabilities, labels, "source_probabilities")
  if np.any(theta < 0) or not np.allclose(theta.sum(axis=1), 1.0, atol=1e-4):
    raise ValueError("source_probabilities: rows must be probability distributions")
  n = theta.shape[0]
  onehot = np.eye(int(y.max()) + 1)[y]                 # (n, C)
  joint = onehot.T @ theta / n                         # P̂(y, z), (C, Z)
  conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-300)  # P̂(y | z)
  eep = np.einsum("nz,nz->n", theta, conditional[y])   # Σ_z P̂(y_i | z) θ(x_i)_z
  return float(np.mean(np.log(eep)))


def pca(features, variance: float = 0.8) -> np.ndarray:
  """Projection of centred ``features`` on the fewest principal axes keeping ``variance``."""
  f = np.asarray(features, np.float64)
  f = f - f.mean(axis=0)
  _, s, vh = np.linalg.svd(f, full_matrices=False)
  ratio = np.cumsum(s ** 2) / max(float((s ** 2).sum()), 1e-300)
  keep = int(np.searchsorted(ratio, variance - 1e-12) + 1)
  return f @ vh[:min(keep, vh.shape[0])].T


def gmm_posteriors(x, components: int, seed: int, *, iterations: int = 100, tol: float = 1e-3,
                   reg: float = 1e-6) -> np.ndarray:
  """Posteriors (n, components) of a full-covariance Gaussian mixture fitted by EM.

  Initialized like scikit-learn's ``GaussianMixture`` (k-means responsibilities; k-means++
  seeding from ``seed``), ``reg`` added to every covariance diagonal, stopping when the mean
  log-likelihood gains less than ``tol``.
  """
  x = np.asarray(x, np.float64)
  n, d = x.shape
  components = min(components, n)
  rng = np.random.default_rng(seed)
  # k-means++ seeding, then Lloyd iterations.
  centres = [x[rng.integers(n)]]
  for _ in range(1, components):
    d2 = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
    p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
    centres.append(x[rng.choice(n, p=p)])
  centres = np.asarray(centres)
  for _ in range(100):
    assign = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    new = np.array([x[assign == j].mean(0) if np.any(assign == j) else centres[j]
                    for j in range(components)])
    if np.allclose(new, centres):
      break
    centres = new
  resp = np.eye(components)[assign]
  previous = -np.inf
  for _ in range(iterations):
    # M step.
    nk = resp.sum(0) + 10 * np.finfo(float).eps
    weights = nk / n
    means = resp.T @ x / nk[:, None]
    log_prob = np.empty((n, components))
    for j in range(components):
      diff = x - means[j]
      cov = (resp[:, j, None] * diff).T @ diff / nk[j] + reg * np.eye(d)
      chol = np.linalg.cholesky(cov)
      z = scipy.linalg.solve_triangular(chol, diff.T, lower=True)
      log_prob[:, j] = (-0.5 * (z ** 2).sum(0) - np.log(np.diag(chol)).sum()
                        - d / 2 * np.log(2 * np.pi) + np.log(weights[j]))
    # E step.
    norm = scipy.special.logsumexp(log_prob, axis=1)
    resp = np.exp(log_prob - norm[:, None])
    ll = float(norm.mean())
    if abs(ll - previous) < tol:
      break
    previous = ll
  return resp


def nleep(features, labels, *, seed: int = 0, variance: float = 0.8,
          components_per_class: int = 5) -> float:
  """NLEEP: LEEP over the posteriors of a 5·C-component GMM on 80%-variance PCA features."""
  f, y = _check(features, labels)
  reduced = pca(f, variance)
  posteriors = gmm_posteriors(reduced, components_per_class * (int(y.max()) + 1), seed)
  return leep(posteriors, y)


def emms(features, labels, label_embeddings: Sequence[Any], *, iterations: int = 10) -> float:
  """EMMS: −mean squared residual of regressing a convex mix of label embeddings on features.

  Args:
    features: (n, d) features; standardized per dimension, with an intercept column.
    labels: (n,) class indices.
    label_embeddings: K matrices (C, e): every class embedded by one of K label encoders (e.g.
      text encoders of the class names; a one-hot identity is one choice). All K must share e;
      each row is L2-normalized.
    iterations: alternating rounds (least squares for the weights W, NNLS for the mix t).
  """
  f, y = _check(features, labels)
  embs = [np.asarray(e, np.float64) for e in label_embeddings]
  if not embs:
    raise ValueError("label_embeddings: needs at least one embedding")
  if len({e.shape for e in embs}) != 1 or embs[0].ndim != 2 or embs[0].shape[0] <= y.max():
    raise ValueError("label_embeddings: all must be (classes, e) of one shape covering every "
                     "label")
  embs = [e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) for e in embs]
  targets = np.stack([e[y] for e in embs], axis=-1)     # (n, e, K)
  n = f.shape[0]
  std = f.std(0)
  x = np.concatenate([(f - f.mean(0)) / np.where(std > 0, std, 1.0), np.ones((n, 1))], axis=1)
  k = targets.shape[-1]
  t = np.full(k, 1.0 / k)
  for _ in range(iterations):
    target = targets @ t                                   # (n, e)
    w, *_ = np.linalg.lstsq(x, target, rcond=None)
    fitted = (x @ w).reshape(-1)
    t, _ = scipy.optimize.nnls(targets.reshape(-1, k), fitted)
    t = t / t.sum() if t.sum() > 0 else np.full(k, 1.0 / k)
  target = targets @ t
  w, *_ = np.linalg.lstsq(x, target, rcond=None)
  return -float(((x @ w - target) ** 2).sum() / n)


def parameter_count(model) -> int:
  """Number of parameters of a Flax NNX model (the "model size" baseline)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return int(sum(np.size(v) for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))


def zero_shot_accuracy(image_features, class_text_features, labels) -> float:
  """Fraction of images whose most cosine-similar class text embedding is their label."""
  img, y = _check(image_features, labels, "image_features")
  txt = np.asarray(class_text_features, np.float64)
  if txt.ndim != 2 or txt.shape[1] != img.shape[1]:
    raise ValueError(f"class_text_features: expected (classes, {img.shape[1]}), got {txt.shape}")
  img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
  txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.argmax(img @ txt.T, axis=1) == y))
