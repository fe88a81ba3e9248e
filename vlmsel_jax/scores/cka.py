"""Centered kernel alignment (CKA) between paired feature matrices.

CKA compares two representations of the same ``n`` samples through their Gram matrices:

  CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   HSIC(K, L) = tr(K H L H),

with ``H = I - 11^T / n`` the centering matrix (Kornblith et al. 2019, "Similarity of neural
network representations revisited"). This module provides

* ``linear_cka``: linear kernels, computed from the centered features without an n x n matrix
  whenever that is the cheaper side;
* ``rbf_cka``: Gaussian kernels whose bandwidth follows the median heuristic of the Kornblith
  reference code (``gram_rbf`` in google-research/representation_similarity);
* ``debiased_linear_cka``: linear kernels with HSIC replaced by the unbiased U-statistic of
  Song et al. (2012), as ``cka(..., debiased=True)`` in the reference code;
* ``MinibatchCKA`` / ``minibatch_cka``: the streaming estimator of Nguyen et al. (2021, "Do wide
  and deep networks learn the same things?"), which averages unbiased HSIC estimates over
  minibatches so that ``n`` never has to fit in one Gram matrix;
  ``streaming_minibatch_cka`` feeds it from any iterator of batches (10⁶ samples and more
  without holding them, or any n × n matrix, in memory).

Every public function validates its inputs with ``check_pair`` and returns a Python float; the
numerical cores are jit-compiled and run in float32.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlmsel_jax.scores import linalg
from vlmsel_jax.scores.checks import FeatureError, check_pair

# Every product goes through linalg.mm (full float32 precision): CKA subtracts large, nearly
# equal sums, which reduced-precision accelerator matmuls (TF32 / bf16 passes) would ruin.


def _use_gram_form(n: int, dx: int, dy: int) -> bool:
  """Whether n x n Gram matrices are cheaper than d x d feature products for these shapes.

  Both forms are exact identities (``||X^T Y||_F^2 = tr(X X^T Y Y^T)``); the feature form costs
  about ``n (dx dy + dx^2 + dy^2)`` and the Gram form about ``n^2 (dx + dy)``. Shapes are static
  under jit, so the choice is made once per compiled shape.
  """
  return n * n * (dx + dy) < n * (dx * dy + dx * dx + dy * dy)


# ----------------------------------------------------------------------------------------------
# Biased (plain) CKA.


@jax.jit
def _linear_cka_core(x: jax.Array, y: jax.Array) -> jax.Array:
  """Linear CKA of two feature matrices; see ``linear_cka``."""
  xc = linalg.center(x)
  yc = linalg.center(y)
  n, dx = x.shape
  dy = y.shape[1]
  if _use_gram_form(n, dx, dy):
    k = linalg.mm(xc, xc.T)
    l = linalg.mm(yc, yc.T)
    cross = jnp.sum(k * l)
    norm_x = jnp.linalg.norm(k)
    norm_y = jnp.linalg.norm(l)
  else:
    cross = jnp.sum(jnp.square(linalg.mm(yc.T, xc)))
    norm_x = jnp.linalg.norm(linalg.mm(xc.T, xc))
    norm_y = jnp.linalg.norm(linalg.mm(yc.T, yc))
  return cross / (norm_x * norm_y)


def linear_cka(x, y) -> float:
  """Linear CKA between paired features ``x`` (n x d_x) and ``y`` (n x d_y), in [0, 1].

  Uses the feature-space identity
  ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` on column-centered features, which
  equals the Gram-matrix definition with linear kernels. Invariant to orthogonal transforms,
  isotropic scaling and translation of either input.

  Raises:
    FeatureError: if either input is not a valid feature matrix or the sample counts differ.
  """
  x, y = check_pair(x, y)
  return float(_linear_cka_core(jnp.asarray(x), jnp.asarray(y)))


def linear_cka_matrix(feats) -> np.ndarray:
  """Symmetric (m, m) matrix of linear CKA between every two of ``m`` feature matrices (the same
  n samples, any widths), ones on the diagonal: the similarity Mordal clusters models by."""
  m = np.eye(len(feats))
  for i in range(len(feats)):
    for j in range(i + 1, len(feats)):
      m[i, j] = m[j, i] = linear_cka(feats[i], feats[j])
  return m


def _sq_distances(x: jax.Array) -> jax.Array:
  """All squared Euclidean distances between rows of ``x`` (n x n, exact zeros on the diagonal)."""
  # Distances are translation invariant; centering first keeps the norm-expansion below from
  # cancelling catastrophically when the features share a large common offset.
  xc = linalg.center(x)
  sq_norms = jnp.sum(xc * xc, axis=1)
  d2 = sq_norms[:, None] + sq_norms[None, :] - 2.0 * linalg.mm(xc, xc.T)
  # Rounding can push near-duplicate pairs slightly negative; a distance cannot be.
  d2 = jnp.maximum(d2, 0.0)
  return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d2)


def _center_gram(gram: jax.Array) -> jax.Array:
  """``H K H``: the Gram matrix with row, column and grand means removed."""
  row_means = jnp.mean(gram, axis=0)
  grand_mean = jnp.mean(row_means)
  return gram - row_means[:, None] - row_means[None, :] + grand_mean


def _gram_cka(k: jax.Array, l: jax.Array) -> jax.Array:
  """Biased CKA from two Gram matrices."""
  kc = _center_gram(k)
  lc = _center_gram(l)
  return jnp.sum(kc * lc) / (jnp.linalg.norm(kc) * jnp.linalg.norm(lc))


@jax.jit
def _rbf_gram(x: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """RBF Gram matrix with the median bandwidth heuristic, and the median squared distance."""
  d2 = _sq_distances(x)
  # The reference takes the median over the full n x n matrix, diagonal zeros included; taking
  # the same median keeps scores comparable with published numbers. linalg.median selects it
  # without sorting the n^2 entries.
  median = linalg.median(d2)
  return jnp.exp(-d2 / (2.0 * sigma**2 * median)), median


@jax.jit
def _rbf_cka_core(x: jax.Array, y: jax.Array, sigma: jax.Array):
  """RBF CKA and the two median squared distances (to detect a degenerate bandwidth)."""
  k, median_x = _rbf_gram(x, sigma)
  l, median_y = _rbf_gram(y, sigma)
  return _gram_cka(k, l), median_x, median_y


def rbf_cka(x, y, sigma: float = 0.5) -> float:
  """CKA with Gaussian (RBF) kernels between paired features ``x`` and ``y``, in [0, 1].

  ``k(a, b) = exp(-||a - b||^2 / (2 bw))`` with bandwidth ``bw = sigma^2 * median`` of all
  squared pairwise distances (the full n x n matrix, diagonal zeros included), separately for
  ``x`` and ``y``. This is the convention of ``gram_rbf(x, threshold=sigma)`` in the Kornblith
  et al. reference code. Memory and time are O(n^2).

  Args:
    x: n x d_x features.
    y: n x d_y features, rows paired with ``x``.
    sigma: bandwidth as a fraction of the median distance; must be positive.

  Raises:
    FeatureError: invalid inputs, or more than half of the pairwise distances of one input are
      zero (the median bandwidth would be zero).
    ValueError: if ``sigma`` is not positive.
  """
  x, y = check_pair(x, y)
  if not sigma > 0:
    raise ValueError(f"sigma must be positive, got {sigma}")
  value, median_x, median_y = _rbf_cka_core(jnp.asarray(x), jnp.asarray(y),
                                            jnp.asarray(sigma, jnp.float32))
  for name, median in (("x", median_x), ("y", median_y)):
    if not float(median) > 0:
      raise FeatureError(f"{name}: the median pairwise distance is zero (more than half of the "
                         "sample pairs coincide), so the median RBF bandwidth is undefined")
  return float(value)


# ----------------------------------------------------------------------------------------------
# Unbiased HSIC (Song et al. 2012) and debiased CKA.


def _song_hsic(tr_kl: jax.Array, k1: jax.Array, l1: jax.Array, n: int) -> jax.Array:
  """Unbiased HSIC estimate from sufficient statistics of the zero-diagonal Gram matrices.

  With ``K~``, ``L~`` the Gram matrices with their diagonals set to zero,

    HSIC_1 = (tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1) / (n (n-3)).

  Args:
    tr_kl: ``tr(K~ L~)``.
    k1: the vector ``K~ 1`` (row sums); ``1^T K~ 1`` is its sum.
    l1: the vector ``L~ 1``.
    n: number of samples (static), at least 4.
  """
  sum_k = jnp.sum(k1)
  sum_l = jnp.sum(l1)
  return (tr_kl + sum_k * sum_l / ((n - 1) * (n - 2))
          - 2.0 / (n - 2) * jnp.dot(k1, l1)) / (n * (n - 3))


def _unbiased_hsic_grams(k: jax.Array, l: jax.Array) -> jax.Array:
  """Unbiased HSIC of two n x n Gram matrices."""
  n = k.shape[0]
  off_diagonal = 1.0 - jnp.eye(n, dtype=k.dtype)
  k = k * off_diagonal
  l = l * off_diagonal
  # Gram matrices are symmetric, so tr(K~ L~) is the elementwise inner product.
  return _song_hsic(jnp.sum(k * l), jnp.sum(k, axis=1), jnp.sum(l, axis=1), n)


def _linear_stats(x: jax.Array):
  """Row squared norms (diag of X X^T) and ``K~ 1`` for the linear kernel, without n x n."""
  diag = jnp.sum(x * x, axis=1)
  return diag, linalg.mm(x, jnp.sum(x, axis=0)) - diag


def _unbiased_hsic_features(x: jax.Array, y: jax.Array, cross_sq: jax.Array) -> jax.Array:
  """Unbiased HSIC of the linear kernels of ``x`` and ``y`` given ``||X^T Y||_F^2``.

  ``tr(K~ L~) = tr(K L) - diag(K) . diag(L)`` and ``tr(K L) = ||X^T Y||_F^2``, so only d x d
  products are needed.
  """
  diag_x, k1 = _linear_stats(x)
  diag_y, l1 = _linear_stats(y)
  return _song_hsic(cross_sq - jnp.dot(diag_x, diag_y), k1, l1, x.shape[0])


@jax.jit
def _debiased_linear_cka_core(x: jax.Array, y: jax.Array) -> jax.Array:
  """Debiased linear CKA; see ``debiased_linear_cka``."""
  # The unbiased estimator is exactly invariant to translating the features (U-centering removes
  # additive row and column effects), so centering changes nothing but the float32 rounding.
  xc = linalg.center(x)
  yc = linalg.center(y)
  n, dx = x.shape
  dy = y.shape[1]
  if _use_gram_form(n, dx, dy):
    k = linalg.mm(xc, xc.T)
    l = linalg.mm(yc, yc.T)
    hsic_xy = _unbiased_hsic_grams(k, l)
    hsic_xx = _unbiased_hsic_grams(k, k)
    hsic_yy = _unbiased_hsic_grams(l, l)
  else:
    hsic_xy = _unbiased_hsic_features(xc, yc, jnp.sum(jnp.square(linalg.mm(yc.T, xc))))
    hsic_xx = _unbiased_hsic_features(xc, xc, jnp.sum(jnp.square(linalg.mm(xc.T, xc))))
    hsic_yy = _unbiased_hsic_features(yc, yc, jnp.sum(jnp.square(linalg.mm(yc.T, yc))))
  return hsic_xy / jnp.sqrt(hsic_xx * hsic_yy)


def debiased_linear_cka(x, y) -> float:
  """Linear CKA with the unbiased HSIC estimator of Song et al. (2012).

  Matches ``cka(gram_linear(x), gram_linear(y), debiased=True)`` of the Kornblith et al.
  reference code. Unlike ``linear_cka`` it is not pulled upwards when the feature dimension is
  large relative to ``n``; the estimate can be slightly negative for unrelated features.

  Raises:
    FeatureError: if either input is not a valid feature matrix or the sample counts differ.
  """
  x, y = check_pair(x, y)
  return float(_debiased_linear_cka_core(jnp.asarray(x), jnp.asarray(y)))


# ----------------------------------------------------------------------------------------------
# Minibatch CKA (Nguyen et al. 2021).

MIN_BATCH = 4  # the unbiased estimator divides by n (n - 3)


class MinibatchCKA(NamedTuple):
  """Running sums of unbiased HSIC estimates over minibatches of paired rows.

  An immutable accumulator (and a JAX pytree): ``update`` returns a new accumulator and leaves
  this one unchanged. Each minibatch contributes unbiased estimates ``hsic(K, L)``,
  ``hsic(K, K)`` and ``hsic(L, L)`` of its linear kernels; the result is
  ``mean hsic(K, L) / sqrt(mean hsic(K, K) * mean hsic(L, L))``. Because each term is unbiased,
  the ratio converges to population linear CKA as the number of batches grows, whatever the
  batch size (Nguyen et al. 2021).

  Usage::

    acc = MinibatchCKA()
    for xb, yb in batches:
      acc = acc.update(xb, yb)
    score = acc.result()

  Attributes:
    hsic_xy: sum over batches of the unbiased HSIC between the two kernels.
    hsic_xx: sum over batches of the unbiased HSIC of the ``x`` kernel with itself.
    hsic_yy: sum over batches of the unbiased HSIC of the ``y`` kernel with itself.
    num_batches: number of batches accumulated.
  """

  hsic_xy: jax.Array | float = 0.0
  hsic_xx: jax.Array | float = 0.0
  hsic_yy: jax.Array | float = 0.0
  num_batches: jax.Array | int = 0

  def canonical(self) -> MinibatchCKA:
    """The same accumulator with every field a strongly typed JAX scalar.

    The defaults are Python numbers; converting them before entering jit keeps the first and
    later updates on one compiled function instead of two (weak vs strong types).
    """
    return MinibatchCKA(jnp.asarray(self.hsic_xy, jnp.float32),
                        jnp.asarray(self.hsic_xx, jnp.float32),
                        jnp.asarray(self.hsic_yy, jnp.float32),
                        jnp.asarray(self.num_batches, jnp.int32))

  def update(self, x_batch, y_batch) -> MinibatchCKA:
    """Returns a new accumulator that also includes one minibatch of paired rows.

    Args:
      x_batch: m x d_x features, m >= 4.
      y_batch: m x d_y features, rows paired with ``x_batch``.

    Raises:
      FeatureError: invalid batch (fewer than 4 rows, NaN, mismatched m, ...).
    """
    x_batch, y_batch = check_pair(x_batch, y_batch, "x_batch", "y_batch", min_samples=MIN_BATCH)
    return _minibatch_update(self.canonical(), jnp.asarray(x_batch), jnp.asarray(y_batch))

  def result(self) -> float:
    """Minibatch CKA of everything accumulated so far.

    Raises:
      ValueError: if no batch has been accumulated.
      FeatureError: if one side's accumulated self-HSIC is not positive (no variation).
    """
    if int(self.num_batches) == 0:
      raise ValueError("MinibatchCKA.result() called before any update()")
    count = float(self.num_batches)
    mean_xy = float(self.hsic_xy) / count
    mean_xx = float(self.hsic_xx) / count
    mean_yy = float(self.hsic_yy) / count
    for name, value in (("x", mean_xx), ("y", mean_yy)):
      if not value > 0:
        raise FeatureError(f"{name}: accumulated HSIC with itself is {value:.3g}; the batches "
                           "carry no variation to compare")
    return mean_xy / float(np.sqrt(mean_xx * mean_yy))


def _batch_update(state: MinibatchCKA, x: jax.Array, y: jax.Array) -> MinibatchCKA:
  """Pure update: ``state`` plus the unbiased HSIC terms of one batch."""
  # Per-batch centering is exact for the unbiased estimator and only improves float32 rounding.
  xc = linalg.center(x)
  yc = linalg.center(y)
  k = linalg.mm(xc, xc.T)
  l = linalg.mm(yc, yc.T)
  return MinibatchCKA(state.hsic_xy + _unbiased_hsic_grams(k, l),
                      state.hsic_xx + _unbiased_hsic_grams(k, k),
                      state.hsic_yy + _unbiased_hsic_grams(l, l),
                      state.num_batches + 1)


_minibatch_update = jax.jit(_batch_update)


@jax.jit
def _scan_batches(state: MinibatchCKA, xb: jax.Array, yb: jax.Array) -> MinibatchCKA:
  """Folds ``_batch_update`` over stacked batches ``xb`` (B x m x d_x), ``yb`` (B x m x d_y)."""
  # One compiled loop instead of B Python-level dispatches.
  def step(carry, batch):
    return _batch_update(carry, *batch), None

  final, _ = jax.lax.scan(step, state, (xb, yb))
  return final


def minibatch_cka(x, y, batch_size: int, seed: int = 0) -> float:
  """Minibatch linear CKA of paired features, streamed in shuffled batches.

  Rows are permuted with ``numpy.random.default_rng(seed)`` (the same permutation for ``x`` and
  ``y``) and cut into ``n // batch_size`` full batches. A final partial batch is used when it
  has at least 4 rows (it is still an unbiased estimate) and dropped otherwise. With
  ``batch_size == n`` this equals ``debiased_linear_cka``.

  Args:
    x: n x d_x features.
    y: n x d_y features, rows paired with ``x``.
    batch_size: rows per minibatch, between 4 and n.
    seed: seed of the row shuffle.

  Raises:
    FeatureError: invalid inputs.
    ValueError: ``batch_size`` outside [4, n].
  """
  x, y = check_pair(x, y)
  n = x.shape[0]
  if not MIN_BATCH <= batch_size <= n:
    raise ValueError(f"batch_size must be between {MIN_BATCH} and n={n}, got {batch_size}")
  order = np.random.default_rng(seed).permutation(n)
  x = x[order]
  y = y[order]
  num_full = n // batch_size
  used = num_full * batch_size
  state = MinibatchCKA().canonical()
  state = _scan_batches(state,
                        jnp.asarray(x[:used]).reshape(num_full, batch_size, x.shape[1]),
                        jnp.asarray(y[:used]).reshape(num_full, batch_size, y.shape[1]))
  if n - used >= MIN_BATCH:
    state = state.update(x[used:], y[used:])
  return state.result()


def streaming_minibatch_cka(batches: Iterable, chunk: int = 64) -> float:
  """Minibatch linear CKA of a stream of paired batches ``(x_batch, y_batch)``.

  The same estimator as ``MinibatchCKA`` (each batch contributes its unbiased HSIC terms), for
  inputs too large to hold: batches are consumed as they come (e.g. read from disk or
  generated), consecutive batches of one shape are folded ``chunk`` at a time in one compiled
  loop, and memory is O(chunk × m × d + m²) for batches of m rows, whatever the total n.
  Equals ``minibatch_cka`` on the same batches in the same order.

  Raises:
    FeatureError: an invalid batch (fewer than 4 rows, NaN, mismatched rows, ...), or no
      variation accumulated.
    ValueError: an empty stream or ``chunk`` < 1.
  """
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  state = MinibatchCKA().canonical()
  pending_x: list[np.ndarray] = []
  pending_y: list[np.ndarray] = []

  def flush(state):
    if len(pending_x) == 1:
      state = _minibatch_update(state, jnp.asarray(pending_x[0]), jnp.asarray(pending_y[0]))
    elif pending_x:
      state = _scan_batches(state, jnp.asarray(np.stack(pending_x)),
                            jnp.asarray(np.stack(pending_y)))
    pending_x.clear()
    pending_y.clear()
    return state

  for i, (xb, yb) in enumerate(batches):
    xb, yb = check_pair(xb, yb, f"x batch {i}", f"y batch {i}", min_samples=MIN_BATCH)
    if pending_x and (xb.shape != pending_x[0].shape or yb.shape != pending_y[0].shape):
      state = flush(state)
    pending_x.append(np.asarray(xb, np.float32))
    pending_y.append(np.asarray(yb, np.float32))
    if len(pending_x) == chunk:
      state = flush(state)
  state = flush(state)
  if int(state.num_batches) == 0:
    raise ValueError("streaming_minibatch_cka: the batch stream is empty")
  return state.result()
