"""Uncertainty of training-free scores: bootstrap intervals, permutation nulls, ranking stability.

Every number here comes from resampling with numpy Generators seeded with ``seed``, drawn with
scipy's conventions, so that ``scipy.stats.bootstrap`` / ``scipy.stats.permutation_test`` given
``rng=np.random.default_rng(seed)`` and the same statistic see the same resamples:

* bootstrap: ``rng.integers(0, n, (B, n))``, one row of paired-sample indices per replicate
  (scipy's ``_bootstrap_resample``); the interval is the percentile interval, ``np.quantile`` of
  the replicates at (1 − confidence) / 2 and 1 − (1 − confidence) / 2 (linear interpolation,
  scipy's ``method="percentile"``).
* permutation null: ``rng.permuted(tile(arange(n), (P, 2, 1)), axis=-1)``, a permutation of each
  of the two samples per replicate (scipy's ``permutation_type="pairings"``), so the pairing of
  image and text rows is shuffled; the one-sided p-value is (1 + #{null at least as good as the
  observed value}) / (1 + P), "as good" with scipy's relative tolerance of 100 float64 eps.

The same bootstrap indices serve every candidate and every metric (the candidates are scored on
the same images), so differences between candidates and the ranking have replicates too.

Score replicates (``score_replicates``) are computed without re-running each score from
scratch, and each equals the score recomputed on the resampled (or re-paired) rows, with these
stated choices:

* linear, debiased and RBF CKA: from the full sample's n×n Gram matrices, by weighting each
  sample with its bootstrap count (batched matrix products, exact); the RBF bandwidth stays at
  the full sample's median heuristic (a resample's median would count its duplicates' zero
  distances).
* RSA and mutual k-NN: copies of one image in a resample are not a pair of images (their
  distance is 0 in both spaces, agreement by construction), so pairs of copies are left out of
  RSA's pairs and a copy is never another copy's neighbour (as ``similarity.mutual_knn`` already
  treats duplicate rows). RSA's Spearman uses the resample's weighted mid-ranks, computed from
  the full sample's sorted distances without a sort per replicate.
* CCA and SVCCA: in the full sample's PCA subspaces (the directions and their number are fixed
  at the full sample's), the canonical correlations of the resampled rows (weighted
  covariances, Cholesky whitening).
* GW: the annealed solver is far too slow to re-run per replicate, so each of ``gw_bootstrap``
  replicates is one entropic solve without CG polish (``GW_REPLICATE_OPTIONS``); the interval is
  the observed value plus the percentiles of (replicate − the same cheap solver on the full
  sample), i.e. the cheap solver's sampling spread around the reported value. GW never reads the
  pairing (its solvers start from the product coupling), so shuffling the pairing leaves it
  unchanged: it has no permutation p-value (NaN, and the report says why).
* scores passed in precomputed (C score, A score) are not functions of the paired samples: no
  interval and no p-value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlmsel_jax.scoring import metrics as rank_metrics
from vlmsel_jax.scores import cka
from vlmsel_jax.scores import distances
from vlmsel_jax.scores import gw
from vlmsel_jax.scores import linalg
from vlmsel_jax.scores import similarity

# One cheap GW solve per bootstrap replicate: a single entropic stage at the annealed schedule's
# first ε, few outer iterations, no polish (see the module docstring).
GW_REPLICATE_OPTIONS = gw.EntropicOptions(epsilon=1e-2, gw_iterations=10, sinkhorn_iterations=100,
                                          polish=False)
# The metrics whose replicates this module computes from the paired samples.
RESAMPLED = ("gw", "cka", "cka_debiased", "cka_rbf", "rsa", "cca", "svcca", "mutual_knn")
PAIRING_FREE = ("gw",)  # Scores that never read the pairing: no permutation null.
CORRELATIONS = ("pearson", "spearman", "kendall", "weighted_tau")
_CORRELATION_FNS = {"pearson": rank_metrics.pearson, "spearman": rank_metrics.spearman,
                    "kendall": rank_metrics.kendall,
                    "weighted_tau": rank_metrics.weighted_kendall_tau}
# scipy.stats.permutation_test's relative tolerance for "as extreme as the observed value".
_TIE_TOLERANCE = 100 * np.finfo(np.float64).eps


@dataclasses.dataclass(frozen=True)
class UncertaintyOptions:
  """How many resamples, at which confidence, from which seed (each a flag of ``score``).

  Attributes:
    bootstrap: bootstrap replicates over the n paired samples (0 = no intervals).
    permutations: pairing permutations of the null (0 = no p-values).
    confidence: level of every interval.
    seed: seed of every resampling stream.
    gw_bootstrap: GW's own (cheaper) bootstrap replicates, at most ``bootstrap``.
    batch: replicates per compiled call (memory: about batch × n² floats).
  """
  bootstrap: int = 1000
  permutations: int = 1000
  confidence: float = 0.95
  seed: int = 0
  gw_bootstrap: int = 50
  batch: int = 32

  def __post_init__(self):
    for name in ("bootstrap", "permutations", "gw_bootstrap"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be at least 0, got {getattr(self, name)}")
    if 0 < self.bootstrap < 20:
      raise ValueError(f"--bootstrap={self.bootstrap} is too few for a percentile interval; "
                       "give at least 20, or 0 for none")
    if not 0.5 <= self.confidence < 1.0:
      raise ValueError(f"--confidence must be in [0.5, 1), got {self.confidence}")
    if self.batch < 1:
      raise ValueError(f"batch must be at least 1, got {self.batch}")

  @property
  def enabled(self) -> bool:
    return self.bootstrap > 0 or self.permutations > 0


# ----------------------------------------------------------------------------------------------
# Resamples and their summaries (pure numpy).


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
  """(resamples, n) indices drawn with replacement: scipy.stats.bootstrap's draw for ``seed``."""
  return np.random.default_rng(seed).integers(0, n, (resamples, n))


def pairing_permutations(n: int, permutations: int, seed: int) -> np.ndarray:
  """(permutations, 2, n): a permutation of each of two samples per replicate, as
  scipy.stats.permutation_test(permutation_type="pairings") draws them for ``seed``."""
  rng = np.random.default_rng(seed)
  return rng.permuted(np.tile(np.arange(n), (permutations, 2, 1)), axis=-1)


def relative_pairings(permutations: np.ndarray) -> np.ndarray:
  """(P, n) ``r`` with statistic(x[p0], y[p1]) = statistic(x, y[r]) for row-symmetric statistics.

  Row t of the permuted data pairs x[p0[t]] with y[p1[t]], so x row a meets y row
  p1[p0⁻¹[a]].
  """
  inverse0 = np.argsort(permutations[:, 0], axis=-1)
  return np.take_along_axis(permutations[:, 1], inverse0, axis=-1)


def counts(indices: np.ndarray, n: int) -> np.ndarray:
  """(B, n) float32: how often each sample appears in each bootstrap resample."""
  out = np.zeros((indices.shape[0], n), np.float32)
  np.add.at(out, (np.arange(indices.shape[0])[:, None], indices), 1.0)
  return out


def percentile_interval(replicates, confidence: float) -> tuple[np.ndarray, np.ndarray]:
  """The percentile interval along axis 0 (scipy.stats.bootstrap(method="percentile")).

  Non-finite replicates (a resample on which a statistic is undefined, e.g. a correlation of a
  constant) are left out; an axis with none left gives NaN.
  """
  reps = np.asarray(replicates, np.float64)
  alpha = (1.0 - confidence) / 2.0
  reps = np.where(np.isfinite(reps), reps, np.nan)
  with np.errstate(all="ignore"):
    if reps.ndim == 1:
      if not np.isfinite(reps).any():
        return np.float64(np.nan), np.float64(np.nan)
      return tuple(np.quantile(reps[np.isfinite(reps)], [alpha, 1.0 - alpha]))
    low, high = np.nanquantile(reps, [alpha, 1.0 - alpha], axis=0)
  return low, high


def permutation_p_value(observed: float, null, higher_is_better: bool = True) -> float:
  """One-sided p-value, scipy.stats.permutation_test's convention (random permutations).

  (1 + #{null ≥ observed − γ}) / (1 + P) with γ = 100 eps |observed|
  (``alternative="greater"``; "less" with ≤ and + γ when lower is better).
  """
  null = np.asarray(null, np.float64)
  if null.size == 0 or not math.isfinite(observed):
    return float("nan")
  gamma = abs(_TIE_TOLERANCE * observed)
  if higher_is_better:
    hits = np.count_nonzero(null >= observed - gamma)
  else:
    hits = np.count_nonzero(null <= observed + gamma)
  return float((hits + 1) / (null.size + 1))


def calibrated_score(observed: float, null) -> float:
  """(observed − null mean) / null standard deviation: the score in units of its own null."""
  null = np.asarray(null, np.float64)
  if null.size < 2:
    return float("nan")
  sd = float(np.std(null, ddof=1))
  return float((observed - np.mean(null)) / sd) if sd > 0 else float("nan")


@dataclasses.dataclass
class RankingStability:
  """What the replicates say about the order of the candidates under one score.

  Attributes:
    p_top1: per candidate, the fraction of replicates in which it is the predicted best (a tie
      for the best shares the replicate equally).
    diff_low, diff_high: (m, m) interval of the oriented difference (i better than j > 0).
    resolved: (m, m) whether the interval of the difference excludes 0.
  """
  p_top1: np.ndarray
  diff_low: np.ndarray
  diff_high: np.ndarray
  resolved: np.ndarray


def ranking_stability(replicates, higher_is_better: bool, confidence: float
                      ) -> RankingStability:
  """Top-1 probabilities and resolved pairs from (B, m) score replicates."""
  reps = np.asarray(replicates, np.float64)
  oriented = reps if higher_is_better else -reps
  finite = np.isfinite(oriented).all(axis=1)
  oriented = oriented[finite]
  m = reps.shape[1]
  if oriented.shape[0] == 0:
    nan = np.full((m, m), np.nan)
    return RankingStability(np.full(m, np.nan), nan, nan, np.zeros((m, m), bool))
  best = oriented == oriented.max(axis=1, keepdims=True)
  p_top1 = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
  diffs = oriented[:, :, None] - oriented[:, None, :]
  low, high = percentile_interval(diffs, confidence)
  resolved = (low > 0) | (high < 0)
  np.fill_diagonal(resolved, False)
  return RankingStability(p_top1, low, high, resolved)


def unresolved_groups(names: Sequence[str], values: Sequence[float], resolved: np.ndarray,
                      higher_is_better: bool) -> list[list[str]]:
  """Candidates in predicted order, chained into groups the score cannot tell apart.

  Walking the predicted order, a candidate joins the current group while some member of the
  group is not resolved from it; a new group starts when it is resolved from every member.
  """
  oriented = np.asarray(values, np.float64) * (1.0 if higher_is_better else -1.0)
  order = np.argsort(-oriented, kind="stable")
  groups: list[list[int]] = []
  for i in order:
    if groups and any(not resolved[i, j] for j in groups[-1]):
      groups[-1].append(int(i))
    else:
      groups.append([int(i)])
  return [[names[i] for i in g] for g in groups]


# ----------------------------------------------------------------------------------------------
# Judgement: a score against the ground truth, with candidates resampled.


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pearson's r of each row pair (NaN where a row is constant), as metrics.pearson."""
  da, db = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
  constant = np.all(a == a[:, :1], axis=1) | np.all(b == b[:, :1], axis=1)
  with np.errstate(all="ignore"):
    r = np.sum(da * db, axis=1) / np.sqrt(np.sum(da * da, axis=1) * np.sum(db * db, axis=1))
  return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def _rowwise_kendall(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Kendall's tau-b of each row pair (NaN where a row is constant), as metrics.kendall."""
  sa = np.sign(a[:, :, None] - a[:, None, :])
  sb = np.sign(b[:, :, None] - b[:, None, :])
  untied = np.count_nonzero(sa, axis=(1, 2)) * np.count_nonzero(sb, axis=(1, 2))
  with np.errstate(all="ignore"):
    tau = np.sum(sa * sb, axis=(1, 2)) / np.sqrt(untied.astype(np.float64))
  return np.where(untied == 0, np.nan, np.clip(tau, -1.0, 1.0))


def _rowwise(correlation: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """One correlation of each row of ``a`` with the same row of ``b`` (scipy's definitions)."""
  import scipy.stats  # pylint: disable=g-import-not-at-top
  if correlation == "pearson":
    return _rowwise_pearson(a, b)
  if correlation == "spearman":
    return _rowwise_pearson(scipy.stats.rankdata(a, axis=1), scipy.stats.rankdata(b, axis=1))
  if correlation == "kendall":
    return _rowwise_kendall(a, b)
  return np.array([_CORRELATION_FNS[correlation](x, y) for x, y in zip(a, b)])


def judgement_uncertainty(scores, truth, *, higher_is_better: bool,
                          options: UncertaintyOptions, truth_sd=None,
                          score_replicates=None) -> dict[str, float]:
  """Intervals and permutation p-values of the correlations and top-1 regret of one score.

  Bootstrap over candidates (``options.bootstrap`` replicates, scipy's draw for ``seed``): each
  replicate takes m candidates with replacement; a candidate's ground truth is redrawn within
  its seed noise where ``truth_sd`` (the standard error of its mean over seeds) is positive,
  and its score is replicate ``b`` of ``score_replicates`` (B_s, m) when given (the score's own
  sampling noise). p-values: pairing permutations of score and ground truth (``permutations``),
  one-sided for a positive correlation. Keys: ``<corr>_ci_low``, ``<corr>_ci_high``,
  ``<corr>_p_value`` for pearson, spearman, kendall, weighted_tau, and ``top1_regret_ci_low`` /
  ``_ci_high``. A replicate on which a correlation is undefined (constant input) is left out.
  """
  score = rank_metrics.orient(scores, higher_is_better)
  truth = np.asarray(truth, np.float64)
  m = score.size
  out: dict[str, float] = {}
  if options.bootstrap:
    picks = bootstrap_indices(m, options.bootstrap, options.seed)
    noise_rng = np.random.default_rng([options.seed, 1])
    sd = np.zeros(m) if truth_sd is None else np.nan_to_num(np.asarray(truth_sd, np.float64))
    if score_replicates is None:
      s = np.broadcast_to(score, (options.bootstrap, m))
    else:
      reps = np.asarray(score_replicates, np.float64) * (1.0 if higher_is_better else -1.0)
      s = reps[np.arange(options.bootstrap) % reps.shape[0]]
    t = np.broadcast_to(truth, (options.bootstrap, m))
    if sd.any():
      t = t + sd * noise_rng.standard_normal((options.bootstrap, m))
    rows = np.arange(options.bootstrap)[:, None]
    s, t = s[rows, picks], t[rows, picks]
    for k in CORRELATIONS:
      out[f"{k}_ci_low"], out[f"{k}_ci_high"] = (
          float(v) for v in percentile_interval(_rowwise(k, s, t), options.confidence))
    regret = [rank_metrics.top1_regret(ti, si) for si, ti in zip(s, t)]
    out["top1_regret_ci_low"], out["top1_regret_ci_high"] = (
        float(v) for v in percentile_interval(regret, options.confidence))
  if options.permutations:
    perms = pairing_permutations(m, options.permutations, options.seed)
    for k in CORRELATIONS:
      observed = _CORRELATION_FNS[k](score, truth)
      null = _rowwise(k, score[perms[:, 0]], truth[perms[:, 1]])
      out[f"{k}_p_value"] = permutation_p_value(observed, null)
  return out


# ----------------------------------------------------------------------------------------------
# Score replicates (jax): statistics of the full sample, then batched weighted / re-paired scores.


def _hsic_weighted(k, l, kl, c):
  """Biased HSIC of Gram matrices ``k``, ``l`` on resamples with counts ``c`` (B, n).

  Σ_ab c_a c_b K̄_ab L̄_ab with K̄ centered under the weights, expanded so that only products of
  the counts with fixed n×n matrices remain (``kl`` = K ∘ L).
  """
  total = jnp.sum(c, axis=1)
  kc, lc = linalg.mm(c, k), linalg.mm(c, l)
  first = jnp.sum(linalg.mm(c, kl) * c, axis=1)
  second = jnp.sum(c * kc * lc, axis=1) * 2.0 / total
  third = jnp.sum(kc * c, axis=1) * jnp.sum(lc * c, axis=1) / total**2
  return first - second + third


@jax.jit
def _cka_weighted(k, l, kl, kk, ll, c):
  return _hsic_weighted(k, l, kl, c) / jnp.sqrt(_hsic_weighted(k, k, kk, c) *
                                                 _hsic_weighted(l, l, ll, c))


@jax.jit
def _cka_permuted(kc, lc, r):
  """Biased CKA of x with y[r] from centered Gram matrices (centering commutes with r)."""
  norm = jnp.linalg.norm(kc) * jnp.linalg.norm(lc)
  return jax.vmap(lambda p: jnp.sum(kc * lc[p][:, p]))(r) / norm


def _song_weighted(k, l, kl, c):
  """Unbiased HSIC (Song et al.) of the resample with counts ``c``, from full-sample Grams."""
  n = c.shape[1]  # A bootstrap resample has n rows.
  dk, dl = jnp.diag(k), jnp.diag(l)
  kc, lc = linalg.mm(c, k) - dk, linalg.mm(c, l) - dl  # K̃1 at a copy of each sample.
  tr_kl = jnp.sum(linalg.mm(c, kl) * c, axis=1) - c @ (dk * dl)
  sum_k, sum_l = jnp.sum(c * kc, axis=1), jnp.sum(c * lc, axis=1)
  dot = jnp.sum(c * kc * lc, axis=1)
  return (tr_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * dot) / (n * (n - 3))


@jax.jit
def _debiased_weighted(k, l, kl, kk, ll, c):
  return _song_weighted(k, l, kl, c) / jnp.sqrt(_song_weighted(k, k, kk, c) *
                                                 _song_weighted(l, l, ll, c))


@jax.jit
def _debiased_permuted(k, l, hsic_xx, hsic_yy, r):
  n = k.shape[0]
  off = 1.0 - jnp.eye(n, dtype=k.dtype)
  kt, lt = k * off, l * off
  k1, l1 = jnp.sum(kt, axis=1), jnp.sum(lt, axis=1)

  def one(p):
    tr = jnp.sum(kt * lt[p][:, p])
    return (tr + jnp.sum(k1) * jnp.sum(l1) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * jnp.dot(k1, l1[p])) / (n * (n - 3))
  return jax.vmap(one)(r) / jnp.sqrt(hsic_xx * hsic_yy)


def _rank_structure(d: np.ndarray, rows: np.ndarray, cols: np.ndarray):
  """The pairs' distances sorted once (host): their order, each sorted position's tie group's
  first and last sorted position, and each pair's sorted position."""
  v = d[rows, cols]
  order = np.argsort(v, kind="stable")
  sorted_v = v[order]
  m = v.size
  starts = np.concatenate([[True], sorted_v[1:] != sorted_v[:-1]])
  ends = np.concatenate([sorted_v[1:] != sorted_v[:-1], [True]])
  first = np.maximum.accumulate(np.where(starts, np.arange(m), 0))
  last = np.minimum.accumulate(np.where(ends, np.arange(m), m - 1)[::-1])[::-1]
  position = np.empty_like(order)
  position[order] = np.arange(m)
  return tuple(a.astype(np.int32) for a in (order, first, last, position))


def _weighted_midranks(w, order, first, last, position):
  """Mid-ranks of the pairs when pair p occurs w_p times (ties share their mean rank)."""
  cumulative = jnp.cumsum(w[order])
  before = cumulative[first] - w[order][first]
  size = cumulative[last] - before
  return (before + (size + 1.0) / 2.0)[position]


@jax.jit
def _rsa_weighted(rows, cols, sx, sy, c):
  def one(cb):
    w = cb[rows] * cb[cols]
    rx = _weighted_midranks(w, *sx)
    ry = _weighted_midranks(w, *sy)
    mean = (jnp.sum(w) + 1.0) / 2.0
    dx, dy = rx - mean, ry - mean
    return jnp.sum(w * dx * dy) / jnp.sqrt(jnp.sum(w * dx * dx) * jnp.sum(w * dy * dy))
  return jax.vmap(one)(c)


@jax.jit
def _rsa_permuted(rows, cols, rank_x, rank_y_matrix, r):
  mean = (rank_x.shape[0] + 1) / 2.0
  dx = rank_x - mean
  norm = jnp.sqrt(jnp.sum(dx * dx))

  def one(p):
    dy = rank_y_matrix[p[rows], p[cols]] - mean
    return jnp.sum(dx * dy) / (norm * jnp.sqrt(jnp.sum(dy * dy)))
  return jax.vmap(one)(r)


def _neighbour_order(x: np.ndarray) -> np.ndarray:
  """Each row's other samples by decreasing cosine similarity (n × (n − 1))."""
  unit = np.asarray(linalg.unit_rows(jnp.asarray(x, jnp.float32)))
  sim = unit @ unit.T
  np.fill_diagonal(sim, -np.inf)
  return np.argsort(-sim, axis=1, kind="stable")[:, :-1].astype(np.int32)


def knn_window(n: int, k: int) -> int:
  """Neighbours per row that a bootstrap replicate of mutual k-NN looks at.

  A resample holds about 63% of the samples, so its k nearest other samples lie among the full
  sample's first ~k / 0.63; this window leaves a wide margin, and a replicate whose k neighbours
  do not fit in it is NaN (left out of the interval) rather than wrong.
  """
  return min(n - 1, 4 * k + 64)


@functools.partial(jax.jit, static_argnames="k")
def _knn_weighted(order_x, order_y, y_position_of_x, c, k):
  window = order_x.shape[1]

  def taken(order, cb):
    # A neighbour with cb copies fills that many of the k slots (copies in position order, the
    # same copies in both spaces, so two spaces share min(taken_x, taken_y) of them).
    cnt = cb[order]
    before = jnp.cumsum(cnt, axis=1) - cnt
    return jnp.clip(k - before, 0.0, cnt), jnp.sum(cnt, axis=1) >= k

  def one(cb):
    take_x, full_x = taken(order_x, cb)
    take_y, full_y = taken(order_y, cb)
    inside = y_position_of_x < window
    take_y_at_x = jnp.where(inside, jnp.take_along_axis(
        take_y, jnp.minimum(y_position_of_x, window - 1), axis=1), 0.0)
    shared = jnp.sum(jnp.minimum(take_x, take_y_at_x), axis=1)
    covered = jnp.all(full_x & full_y | (cb == 0))
    return jnp.where(covered, jnp.sum(cb * shared) / (jnp.sum(cb) * k), jnp.nan)
  return jax.vmap(one)(c)


@jax.jit
def _knn_permuted(adj_x, adj_y, k, r):
  n = adj_x.shape[0]
  return jax.vmap(lambda p: jnp.sum(adj_x * adj_y[p][:, p]))(r) / (n * k)


def _cca_mean(cxx, cyy, cxy, count):
  """Mean of the ``count`` largest canonical correlations from (weighted) covariances."""
  lx, ly = jnp.linalg.cholesky(cxx), jnp.linalg.cholesky(cyy)
  t = jax.scipy.linalg.solve_triangular(lx, cxy, lower=True)
  t = jax.scipy.linalg.solve_triangular(ly, t.T, lower=True).T
  gram = t.T @ t if t.shape[1] <= t.shape[0] else t @ t.T
  corr = jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh(gram), 0.0, 1.0))[::-1]
  return jnp.sum(jnp.where(jnp.arange(corr.shape[0]) < count, corr, 0.0)) / count


@functools.partial(jax.jit, static_argnames="count")
def _cca_weighted(ux, uy, c, count):
  def one(cb):
    total = jnp.sum(cb)
    mx, my = cb @ ux / total, cb @ uy / total
    wx, wy = ux * cb[:, None], uy * cb[:, None]
    cxx = linalg.mm(wx.T, ux) - total * jnp.outer(mx, mx)
    cyy = linalg.mm(wy.T, uy) - total * jnp.outer(my, my)
    cxy = linalg.mm(wx.T, uy) - total * jnp.outer(mx, my)
    return _cca_mean(cxx, cyy, cxy, count)
  return jax.vmap(one)(c)


@functools.partial(jax.jit, static_argnames="count")
def _cca_permuted(ux, uy, r, count):
  def one(p):
    corr = jnp.linalg.svd(linalg.mm(ux.T, uy[p]), compute_uv=False)
    corr = jnp.clip(corr, 0.0, 1.0)
    return jnp.sum(jnp.where(jnp.arange(corr.shape[0]) < count, corr, 0.0)) / count
  return jax.vmap(one)(r)


def _pca_basis(x: np.ndarray, variance: float) -> np.ndarray:
  """The full sample's kept PCA directions in sample space (as ``similarity.cca`` keeps them)."""
  # pylint: disable=protected-access
  u, s = similarity._principal_basis(jnp.asarray(x, jnp.float32))
  keep = similarity._num_kept(np.asarray(s), x.shape[0], x.shape[1], variance, None)
  # pylint: enable=protected-access
  return np.asarray(u[:, :keep])


class _Side:
  """One feature matrix's full-sample statistics, computed on first use and kept."""

  def __init__(self, x: np.ndarray, distance: str, knn_k: int, rbf_sigma: float):
    self.x = np.asarray(x, np.float32)
    self._distance, self._k, self._sigma = distance, knn_k, rbf_sigma
    self._cache: dict = {}

  def get(self, key: str, build: Callable):
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  @property
  def gram(self):
    return self.get("gram", lambda: (lambda xc: linalg.mm(xc, xc.T))(
        linalg.center(jnp.asarray(self.x))))

  @property
  def rbf(self):
    gram = cka._rbf_gram  # pylint: disable=protected-access
    return self.get("rbf", lambda: gram(jnp.asarray(self.x), self._sigma)[0])

  def rank_structure(self, rows, cols):
    return self.get("ranks", lambda: tuple(jnp.asarray(a) for a in _rank_structure(
        np.asarray(distances.pairwise_distances(jnp.asarray(self.x), self._distance)), rows, cols)))

  @property
  def neighbours(self):
    return self.get("neighbours", lambda: jnp.asarray(_neighbour_order(self.x)))

  @property
  def adjacency(self):
    def build():
      order = np.asarray(self.neighbours)[:, :self._k]
      adj = np.zeros((order.shape[0],) * 2, np.float32)
      adj[np.arange(order.shape[0])[:, None], order] = 1.0
      return jnp.asarray(adj)
    return self.get("adjacency", build)

  def pca(self, variance: float):
    return self.get(f"pca{variance}", lambda: jnp.asarray(_pca_basis(self.x, variance)))


def _batched(fn, rows: np.ndarray, batch: int) -> np.ndarray:
  """``fn`` over ``rows`` in chunks of ``batch`` (the last one padded, so one compiled shape)."""
  out = []
  for start in range(0, rows.shape[0], batch):
    chunk = rows[start:start + batch]
    pad = batch - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(jnp.asarray(chunk)), np.float64)[:batch - pad])
  return np.concatenate(out) if out else np.zeros(0)


def cheap_replicates(metric: str, cand: _Side, text: _Side, *, counts_: np.ndarray | None,
                     pairings: np.ndarray | None, settings, batch: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(bootstrap replicates, permutation null) of one jit-batched metric for one candidate."""
  n = cand.x.shape[0]
  boot = perm = np.zeros(0)
  if metric in ("cka", "cka_rbf"):
    k, l = (cand.gram, text.gram) if metric == "cka" else (cand.rbf, text.rbf)
    if counts_ is not None:
      kl, kk, ll = k * l, k * k, l * l
      boot = _batched(lambda c: _cka_weighted(k, l, kl, kk, ll, c), counts_, batch)
    if pairings is not None:
      kc, lc = cka._center_gram(k), cka._center_gram(l)  # pylint: disable=protected-access
      perm = _batched(lambda r: _cka_permuted(kc, lc, r), pairings, batch)
  elif metric == "cka_debiased":
    k, l = cand.gram, text.gram
    if counts_ is not None:
      kl, kk, ll = k * l, k * k, l * l
      boot = _batched(lambda c: _debiased_weighted(k, l, kl, kk, ll, c), counts_, batch)
    if pairings is not None:
      ones = jnp.ones((1, n), jnp.float32)
      hxx, hyy = _song_weighted(k, k, k * k, ones)[0], _song_weighted(l, l, l * l, ones)[0]
      perm = _batched(lambda r: _debiased_permuted(k, l, hxx, hyy, r), pairings, batch)
  elif metric == "rsa":
    rows_np, cols_np = np.triu_indices(n, k=1)
    sx, sy = cand.rank_structure(rows_np, cols_np), text.rank_structure(rows_np, cols_np)
    rows, cols = jnp.asarray(rows_np, jnp.int32), jnp.asarray(cols_np, jnp.int32)
    if counts_ is not None:
      boot = _batched(lambda c: _rsa_weighted(rows, cols, sx, sy, c), counts_, batch)
    if pairings is not None:
      ones = jnp.ones((rows.shape[0],), jnp.float32)
      rank_x = _weighted_midranks(ones, *sx)
      rank_y = _weighted_midranks(ones, *sy)
      matrix = jnp.zeros((n, n), jnp.float32).at[rows, cols].set(rank_y)
      matrix = matrix + matrix.T
      perm = _batched(lambda r: _rsa_permuted(rows, cols, rank_x, matrix, r), pairings, batch)
  elif metric == "mutual_knn":
    k = settings.knn_k
    if counts_ is not None:
      window = knn_window(n, k)
      order_x, order_y = np.asarray(cand.neighbours), np.asarray(text.neighbours)
      # Each sample's column in each row of the text's neighbour order (n: itself, absent).
      y_position = np.full((n, n), n, np.int32)
      y_position[np.arange(n)[:, None], order_y] = np.arange(n - 1)
      y_position_of_x = np.take_along_axis(y_position, order_x[:, :window], axis=1)
      ox, oy = jnp.asarray(order_x[:, :window]), jnp.asarray(order_y[:, :window])
      boot = _batched(lambda c: _knn_weighted(ox, oy, jnp.asarray(y_position_of_x), c, k),
                      counts_, batch)
    if pairings is not None:
      perm = _batched(lambda r: _knn_permuted(cand.adjacency, text.adjacency, float(k), r),
                      pairings, batch)
  elif metric in ("cca", "svcca"):
    variance = settings.cca_pca_variance if metric == "cca" else settings.svcca_keep
    ux, uy = cand.pca(variance), text.pca(variance)
    # One compiled program per pair of kept widths. (Zero-padding the widths to share programs
    # hung XLA's CPU runtime on the demo: kept exact and unpadded.)
    count = min(ux.shape[1], uy.shape[1])
    if counts_ is not None:
      boot = _batched(lambda c: _cca_weighted(ux, uy, c, count), counts_, batch)
    if pairings is not None:
      perm = _batched(lambda r: _cca_permuted(ux, uy, r, count), pairings, batch)
  else:
    raise ValueError(f"no replicates for metric {metric!r}")
  return boot, perm


def gw_replicates(candidates: Sequence[np.ndarray], text: np.ndarray, indices: np.ndarray,
                  settings) -> tuple[np.ndarray, np.ndarray]:
  """GW_REPLICATE_OPTIONS solves: (value on the full sample per candidate (m,), and on each
  resample (R, m)), each resample's rows taken from every candidate and the text alike."""
  def solve(rows):
    results = gw.gw_distances([c[rows] for c in candidates], text[rows],
                              options=GW_REPLICATE_OPTIONS, distance=settings.distance,
                              scale=settings.scale, batch_mode=settings.gw_batch_mode)
    return np.array([r.value for r in results])
  full = solve(np.arange(text.shape[0]))
  reps = np.stack([solve(rows) for rows in indices]) if len(indices) else np.zeros((0, len(full)))
  return full, reps


@dataclasses.dataclass
class MetricUncertainty:
  """One metric's resampling results over the pool (candidate order of the pool).

  Attributes:
    replicates: (B, m) bootstrap replicates (GW: shifted to the reported values; empty if none).
    null: (P, m) permutation null (empty for pairing-free scores or when off).
    ci_low, ci_high, p_value, calibrated: per candidate.
    note: how this metric's replicates were made, when it differs from the module's rule.
    cpu_seconds: the process CPU time its replicates took (all threads).
  """
  replicates: np.ndarray
  null: np.ndarray
  ci_low: np.ndarray
  ci_high: np.ndarray
  p_value: np.ndarray
  calibrated: np.ndarray
  note: str = ""
  cpu_seconds: float = 0.0


def score_uncertainty(metric: str, names: Sequence[str], candidates: Sequence[np.ndarray],
                      text: np.ndarray, observed: Mapping[str, float], settings,
                      options: UncertaintyOptions, sides: dict | None = None, *,
                      higher_is_better: bool = True) -> MetricUncertainty | None:
  """Bootstrap intervals, permutation p-values and calibrated scores of one metric.

  ``observed`` holds the reported values (candidate → value); ``sides`` caches the full-sample
  statistics between metrics (pass the same dict for every metric of a pool); ``settings`` is the
  pool's ``ScoreSettings``. None for a metric that is not a function of the paired samples.
  """
  if metric not in RESAMPLED:
    return None
  start = time.process_time()
  result = _score_uncertainty(metric, names, candidates, text, observed, settings, options,
                              sides, higher_is_better)
  result.cpu_seconds = time.process_time() - start
  return result


def _score_uncertainty(metric, names, candidates, text, observed, settings, options, sides,
                       higher_is_better) -> MetricUncertainty:
  higher = higher_is_better
  n, m = text.shape[0], len(names)
  values = np.array([observed[c] for c in names], np.float64)
  nan = np.full(m, np.nan)
  if metric == "gw":
    r = min(options.gw_bootstrap, options.bootstrap)
    if r == 0:
      return MetricUncertainty(np.zeros((0, m)), np.zeros((0, m)), nan, nan, nan, nan)
    indices = bootstrap_indices(n, options.bootstrap, options.seed)[:r]
    full, reps = gw_replicates(candidates, text, indices, settings)
    shifted = values + (reps - full)
    low, high = percentile_interval(shifted, options.confidence)
    note = (f"{r} bootstrap replicates, each one entropic solve (ε "
            f"{GW_REPLICATE_OPTIONS.epsilon:g}, {GW_REPLICATE_OPTIONS.gw_iterations} outer "
            "iterations, no CG polish), centred on the reported value; no permutation p-value: "
            "GW never reads the pairing, so shuffling it changes nothing")
    return MetricUncertainty(shifted, np.zeros((0, m)), low, high, nan, nan, note)
  sides = {} if sides is None else sides
  text_side = sides.setdefault("__text__", _Side(text, settings.distance, settings.knn_k,
                                                   settings.rbf_sigma))
  counts_ = (counts(bootstrap_indices(n, options.bootstrap, options.seed), n)
             if options.bootstrap else None)
  pairings = (relative_pairings(pairing_permutations(n, options.permutations, options.seed))
              .astype(np.int32) if options.permutations else None)
  boot_cols, null_cols = [], []
  for name, x in zip(names, candidates):
    side = sides.setdefault(name, _Side(x, settings.distance, settings.knn_k,
                                        settings.rbf_sigma))
    # SVCCA at CCA's variance is CCA (similarity.svcca): its replicates are computed once.
    key = (("cca", settings.cca_pca_variance if metric == "cca" else settings.svcca_keep)
           if metric in ("cca", "svcca") else (metric,))
    done = sides.setdefault("__replicates__", {})
    if (name,) + key not in done:
      done[(name,) + key] = cheap_replicates(metric, side, text_side, counts_=counts_,
                                             pairings=pairings, settings=settings,
                                             batch=options.batch)
    boot, null = done[(name,) + key]
    boot_cols.append(boot)
    null_cols.append(null)
  boot = np.stack(boot_cols, axis=1)
  null = np.stack(null_cols, axis=1)
  low, high = percentile_interval(boot, options.confidence) if boot.size else (nan, nan)
  p = np.array([permutation_p_value(v, null[:, i], higher) if null.size else np.nan
                for i, v in enumerate(values)])
  z = np.array([calibrated_score(v, null[:, i]) for i, v in enumerate(values)])
  return MetricUncertainty(boot, null, np.asarray(low), np.asarray(high), p, z)
