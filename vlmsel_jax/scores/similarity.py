"""Representation-similarity scores other than CKA: RSA, CCA, SVCCA and mutual k-NN.

Each score compares a candidate encoder's image features ``x`` (n x d_x) with the paired LLM
caption features ``y`` (n x d_y) and returns a Python float:

* ``rsa``: Spearman correlation of the two pairwise-distance vectors (representational
  similarity analysis, Kriegeskorte et al. 2008);
* ``cca``: mean canonical correlation after a PCA reduction of each side;
* ``svcca``: SVCCA of Raghu et al. (2017), SVD-reduce to the directions holding 99% of the
  variance, then mean CCA;
* ``mutual_knn``: mutual k-nearest-neighbour alignment of Huh et al. (2024, "The platonic
  representation hypothesis").

Inputs are validated with ``check_pair``; the numerical cores are jit-compiled and run in
float32. Data-dependent choices (how many PCA directions to keep) are made in Python between two
compiled calls so that every compiled shape stays static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlmsel_jax.scores import distances
from vlmsel_jax.scores import linalg
from vlmsel_jax.scores.checks import FeatureError, check_pair

# Products go through linalg.mm (full float32): distances and canonical correlations must stay
# comparable with float64 references on accelerators too.
_RSA_DISTANCES = distances.DISTANCES


# ----------------------------------------------------------------------------------------------
# RSA.


def _average_ranks(v: jax.Array) -> jax.Array:
  """1-based ranks of ``v`` with ties given their average rank (``scipy.stats.rankdata``)."""
  m = v.shape[0]
  order = jnp.argsort(v)
  sorted_v = v[order]
  index = jnp.arange(m, dtype=jnp.int32)
  differs = sorted_v[1:] != sorted_v[:-1]
  starts_group = jnp.concatenate([jnp.array([True]), differs])
  ends_group = jnp.concatenate([differs, jnp.array([True])])
  # First and last sorted position of each element's tie group; the average rank of the group is
  # their midpoint. Cumulative max/min avoid summing positions, which could overflow int32.
  first = jax.lax.cummax(jnp.where(starts_group, index, 0))
  last = jax.lax.cummin(jnp.where(ends_group, index, m - 1), reverse=True)
  sorted_ranks = (first + last).astype(jnp.float32) / 2.0 + 1.0
  return jnp.zeros(m, jnp.float32).at[order].set(sorted_ranks)


@functools.partial(jax.jit, static_argnames="distance")
def _rsa_core(x: jax.Array, y: jax.Array, distance: str):
  """Spearman correlation of upper-triangle distances, and the two rank spreads."""
  rows, cols = np.triu_indices(x.shape[0], k=1)
  rank_x = _average_ranks(distances.pairwise_distances(x, distance)[rows, cols])
  rank_y = _average_ranks(distances.pairwise_distances(y, distance)[rows, cols])
  # Average ranks always have mean (m + 1) / 2, ties or not; subtracting the exact value instead
  # of a float32 sum over ~n^2/2 entries keeps the correlation accurate.
  mean_rank = (rank_x.shape[0] + 1) / 2.0
  cx = rank_x - mean_rank
  cy = rank_y - mean_rank
  norm_x = jnp.sqrt(jnp.sum(cx * cx))
  norm_y = jnp.sqrt(jnp.sum(cy * cy))
  return jnp.sum(cx * cy) / (norm_x * norm_y), norm_x, norm_y


def rsa(x, y, distance: str = "angular") -> float:
  """Representational similarity: Spearman correlation of the pairwise-distance structure.

  Computes the distances between all pairs ``i < j`` of samples within ``x`` and within ``y``
  and returns the Spearman rank correlation of the two vectors (ties get average ranks), in
  [-1, 1]. Memory and time are O(n^2).

  Args:
    x: n x d_x features.
    y: n x d_y features, rows paired with ``x``.
    distance: ``"angular"`` (``arccos`` of the cosine similarity), ``"cosine"``
      (``1 - cosine similarity``) or ``"euclidean"``.

  Raises:
    FeatureError: invalid inputs, or all pairwise distances of one input are equal.
    ValueError: unknown ``distance``.
  """
  if distance not in _RSA_DISTANCES:
    raise ValueError(f"distance must be one of {_RSA_DISTANCES}, got {distance!r}")
  x, y = check_pair(x, y)
  rho, spread_x, spread_y = _rsa_core(jnp.asarray(x), jnp.asarray(y), distance)
  for name, spread in (("x", spread_x), ("y", spread_y)):
    if not float(spread) > 0:
      raise FeatureError(f"{name}: all pairwise {distance} distances are equal, so their ranks "
                         "carry no information")
  return float(rho)


# ----------------------------------------------------------------------------------------------
# CCA and SVCCA.


@jax.jit
def _principal_basis(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Orthonormal principal directions in sample space (left singular vectors) of centered ``x``.

  Returns ``(u, s)``: ``u`` is n x r with r = min(n, d), ``s`` the singular values, descending.
  The PCA-reduced features ``u[:, :k] * s[:k]`` span the same space as ``u[:, :k]``.
  """
  u, s, _ = jnp.linalg.svd(linalg.center(x), full_matrices=False)
  return u, s


def _num_kept(s: np.ndarray, n: int, d: int, variance: float | None, dim: int | None) -> int:
  """How many principal directions to keep.

  Keeps ``dim`` directions if given, else the fewest whose cumulative share of the variance
  reaches ``variance``; then caps the count at the numerical rank and at ``(n - 1) // 2``.

  Why the last cap: centered features live in an (n - 1)-dimensional sample space, and two
  subspaces of dimensions k_x + k_y > n - 1 must intersect, which would produce canonical
  correlations of exactly 1 whatever the data. Capping each side at ``(n - 1) // 2`` rules that
  out.
  """
  s = np.asarray(s, np.float64)
  # numpy.linalg.matrix_rank's tolerance, at float32 precision since the SVD ran in float32.
  rank = int(np.sum(s > s[0] * max(n, d) * np.finfo(np.float32).eps))
  if dim is not None:
    keep = dim
  else:
    share = np.cumsum(s**2) / np.sum(s**2)
    # Slack for float rounding, so that variance=1.0 can be met by a cumsum of 0.9999999.
    keep = int(np.searchsorted(share, variance - 1e-6)) + 1
  return max(1, min(keep, rank, (n - 1) // 2))


@jax.jit
def _mean_canonical_correlation(u_x: jax.Array, k_x: jax.Array, u_y: jax.Array,
                                k_y: jax.Array, count: jax.Array) -> jax.Array:
  """Mean of the ``count`` largest canonical correlations between span(u_x[:, :k_x]) and
  span(u_y[:, :k_y]).

  For orthonormal bases ``Qx``, ``Qy`` the canonical correlations are the singular values of
  ``Qx^T Qy`` (cosines of the principal angles; Bjorck & Golub 1973). The first ``k`` left
  singular vectors are already an orthonormal basis of the k-dimensional PCA reduction, so no
  further QR is needed. Unused columns are zeroed rather than sliced so that one compiled shape
  serves every ``k``.
  """
  q_x = u_x * (jnp.arange(u_x.shape[1]) < k_x)
  q_y = u_y * (jnp.arange(u_y.shape[1]) < k_y)
  corr = jnp.linalg.svd(linalg.mm(q_x.T, q_y), compute_uv=False)
  # Rounding can lift a cosine slightly above 1.
  corr = jnp.clip(corr, 0.0, 1.0)
  used = jnp.arange(corr.shape[0]) < count
  return jnp.sum(jnp.where(used, corr, 0.0)) / count


def _reduced_cca(x, y, variance: float | None, dim: int | None, n_components: int | None):
  """Mean canonical correlation of PCA-reduced ``x`` and ``y`` (validated numpy arrays)."""
  n = x.shape[0]
  u_x, s_x = _principal_basis(jnp.asarray(x))
  u_y, s_y = _principal_basis(jnp.asarray(y))
  k_x = _num_kept(np.asarray(s_x), n, x.shape[1], variance, dim)
  k_y = _num_kept(np.asarray(s_y), n, y.shape[1], variance, dim)
  count = min(k_x, k_y) if n_components is None else min(n_components, k_x, k_y)
  return float(_mean_canonical_correlation(u_x, k_x, u_y, k_y, count))


def cca(x, y, n_components: int | None = None, pca_variance: float = 0.99,
        pca_dim: int | None = None) -> float:
  """Mean canonical correlation between PCA-reduced ``x`` and ``y``, in [0, 1].

  Each side is centered and reduced by PCA: by default to the fewest principal directions that
  explain ``pca_variance`` (99%) of its variance, or to exactly ``pca_dim`` directions when
  given. Either way each side keeps at most its numerical rank and at most ``(n - 1) // 2``
  directions, so that the reduced spaces cannot intersect by dimension count alone (which would
  force correlations of 1). Canonical correlations are the singular values of ``Qx^T Qy`` for
  orthonormal bases of the two reduced spaces. Invariant to any invertible linear map of either
  input when no direction is dropped.

  Args:
    x: n x d_x features.
    y: n x d_y features, rows paired with ``x``.
    n_components: average only the largest ``n_components`` canonical correlations (at most
      ``min(k_x, k_y)``, the number that exist); default all of them.
    pca_variance: fraction of variance in (0, 1] the kept directions must explain; 1.0 keeps
      every numerically nonzero direction (up to the cap).
    pca_dim: keep exactly this many directions per side (up to the caps); overrides
      ``pca_variance``.

  Raises:
    FeatureError: invalid inputs.
    ValueError: ``pca_variance`` outside (0, 1], ``pca_dim`` or ``n_components`` below 1.
  """
  if not 0.0 < pca_variance <= 1.0:
    raise ValueError(f"pca_variance must be in (0, 1], got {pca_variance}")
  if pca_dim is not None and pca_dim < 1:
    raise ValueError(f"pca_dim must be at least 1, got {pca_dim}")
  if n_components is not None and n_components < 1:
    raise ValueError(f"n_components must be at least 1, got {n_components}")
  x, y = check_pair(x, y)
  return _reduced_cca(x, y, pca_variance, pca_dim, n_components)


def svcca(x, y, keep: float = 0.99) -> float:
  """SVCCA (Raghu et al. 2017): mean canonical correlation of the SVD-reduced features.

  Each side is centered and reduced to the top singular directions that explain a ``keep``
  fraction of its variance (99% as in the paper); the score is the mean of all canonical
  correlations between the two reduced spaces, in [0, 1]. The same per-side cap as ``cca``
  applies (numerical rank and ``(n - 1) // 2``); with it, ``svcca(x, y, keep)`` equals
  ``cca(x, y, pca_variance=keep)``. Invariant to orthogonal transforms, isotropic scaling and
  translation of either input, but, unlike plain CCA, not to arbitrary invertible maps, which
  change which directions hold the variance.

  Raises:
    FeatureError: invalid inputs.
    ValueError: ``keep`` outside (0, 1].
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(f"keep must be in (0, 1], got {keep}")
  x, y = check_pair(x, y)
  return _reduced_cca(x, y, keep, None, None)


# ----------------------------------------------------------------------------------------------
# Mutual k-nearest neighbours.


def _cosine_knn(x: jax.Array, k: int) -> jax.Array:
  """Indices (n x k) of each row's k most cosine-similar other rows."""
  unit = linalg.unit_rows(x)
  sim = linalg.mm(unit, unit.T)
  # A sample is not its own neighbour, even when another row duplicates it.
  sim = jnp.where(jnp.eye(x.shape[0], dtype=bool), -jnp.inf, sim)
  return jax.lax.top_k(sim, k)[1]


@functools.partial(jax.jit, static_argnames="k")
def _mutual_knn_core(x: jax.Array, y: jax.Array, k: int) -> jax.Array:
  """Total over samples of |N_x(i) & N_y(i)| (an integer)."""
  nn_x = _cosine_knn(x, k)
  nn_y = _cosine_knn(y, k)
  # Indices within one row are distinct, so counting equal pairs counts the intersection; the
  # n x k x k comparison is cheaper than n x n membership masks for k << n.
  return jnp.sum(nn_x[:, :, None] == nn_y[:, None, :])


def mutual_knn(x, y, k: int = 10) -> float:
  """Mutual k-nearest-neighbour alignment (Huh et al. 2024), in [0, 1].

  For each sample, take its k nearest other samples by cosine similarity in ``x`` and in ``y``;
  the score is the mean over samples of the fraction of the k neighbours the two sets share.
  Independent features score about ``k / (n - 1)``. Memory and time are O(n^2).

  Args:
    x: n x d_x features.
    y: n x d_y features, rows paired with ``x``.
    k: neighbours per sample, 1 <= k < n.

  Raises:
    FeatureError: invalid inputs.
    ValueError: ``k`` outside [1, n).
  """
  x, y = check_pair(x, y)
  n = x.shape[0]
  if not 1 <= k < n:
    raise ValueError(f"k must satisfy 1 <= k < n={n}, got {k}")
  # The integer total is exact; dividing in float64 keeps identical neighbourhoods at exactly 1.
  return int(_mutual_knn_core(jnp.asarray(x), jnp.asarray(y), int(k))) / (n * k)
