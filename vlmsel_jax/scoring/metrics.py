"""Ranking and correlation metrics that judge a score against trained-VLM accuracy.

A score is judged over a small set of candidates (typically 3 to 50 vision encoders): ``true`` holds
each candidate's trained accuracy and ``predicted`` the training-free score. Every function here
reads a larger ``predicted``/``scores`` value as "predicted better"; scores where lower is better
(e.g. a Gromov-Wasserstein distance) must be flipped first with ``orient``.

The correlations follow scipy's definitions and the NDCG follows scikit-learn's, but are computed
here in plain numpy so that (a) constant inputs give NaN without the warnings scipy prints, and
(b) the tests against scipy / scikit-learn compare two independent computations.

Ties are ties, never broken by input order (so a metric never depends on how the candidates
were listed or named). The correlations follow scipy's tie conventions (average ranks for
Spearman, tau-b for Kendall, scipy's weightedtau for the weighted tau). The top-k style metrics
(``ndcg_at_k``, ``recall_at_k``, ``top_k_overlap``, ``top1_regret``) are the expectation over a
uniformly random order of every group of tied candidates: a tied group straddling the cutoff k
puts each of its members in the top k with probability (slots left) / (group size), and the
pick of a tied top group is each of its members with equal probability. A constant score thus
gets recall@1 = (number of best candidates) / n and a top-1 regret of the mean shortfall from
the best. recall@1 is still 1.0 exactly when top1_regret is 0 (both say every candidate of the
tied top group is a best one). ``top_group`` names the tied top group, for reports of a pick.

All functions need 1-D, equal-length, finite inputs with at least 2 candidates and raise
``ValueError`` with a one-line message otherwise. With 2 candidates the correlations are
degenerate (always +1, -1 or NaN); use at least 3 for a meaningful value.
"""

from __future__ import annotations

import fractions
import math
from typing import Sequence

import numpy as np

MIN_CANDIDATES = 2


def _check_1d(a, name: str, *, min_len: int = MIN_CANDIDATES) -> np.ndarray:
  """Returns ``a`` as a float64 1-D array, or raises ValueError naming ``name``."""
  arr = np.asarray(a)
  if arr.ndim != 1:
    raise ValueError(
        f"{name}: expected a 1-D array (one value per candidate), got shape {arr.shape}")
  if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
  if np.issubdtype(arr.dtype, np.complexfloating):
    raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
  if arr.size < min_len:
    raise ValueError(f"{name}: needs at least {min_len} candidates, got {arr.size}")
  arr = arr.astype(np.float64)
  finite = np.isfinite(arr)
  if not finite.all():
    kind = "NaN" if np.isnan(arr).any() else "Inf"
    first = int(np.flatnonzero(~finite)[0])
    raise ValueError(f"{name}: {kind} values at {arr.size - int(finite.sum())} of {arr.size} "
                     f"positions (first at index {first})")
  return arr


def _check_pair(a, b, a_name: str, b_name: str) -> tuple[np.ndarray, np.ndarray]:
  """Checks two per-candidate arrays: each valid, and one value per candidate in both."""
  a = _check_1d(a, a_name)
  b = _check_1d(b, b_name)
  if a.size != b.size:
    raise ValueError(f"{a_name} has {a.size} candidates but {b_name} has {b.size}; "
                     "they must be paired per candidate")
  return a, b


def _check_k(k, n: int) -> int:
  """Returns ``k`` clamped to ``n``, or raises ValueError if it is not a positive integer."""
  # bool is an int subclass; k=True is almost certainly a mistake, not k=1.
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  return min(int(k), n)


def _is_constant(a: np.ndarray) -> bool:
  # Exact equality, not a tolerance: the mean of identical floats can round away from the value,
  # so a centred-variance test could call a constant array non-constant.
  return bool(np.all(a == a[0]))


def _top_k_probabilities(a: np.ndarray, k: int) -> np.ndarray:
  """P(candidate i is among the ``k`` largest of ``a``) when tied values are ordered at random.

  A candidate with ``above`` strictly larger values and ``tied`` equal values (itself included)
  gets the ``clip(k − above, 0, tied)`` slots its group has left, each of its members equally.
  """
  ascending = np.sort(a)
  above = a.size - np.searchsorted(ascending, a, side="right")
  tied = np.searchsorted(ascending, a, side="right") - np.searchsorted(ascending, a, side="left")
  return np.clip(k - above, 0, tied) / tied


def top_group(scores) -> np.ndarray:
  """Indices (ascending) of every candidate tied at the largest score: the predicted best.

  More than one index means the score cannot tell those candidates apart; a report should say
  so (e.g. "tie of 3") rather than name whichever happened to be listed first.
  """
  scores = _check_1d(scores, "scores", min_len=1)
  return np.flatnonzero(scores == scores.max())


def competition_ranks(scores) -> np.ndarray:
  """1-based ranks by decreasing ``scores``, tied candidates sharing their best rank.

  scipy.stats.rankdata(-scores, method="min"): scores (5, 7, 7, 1) rank (3, 1, 1, 4). An integer
  rank that ties keep equal, for tables where an average rank such as 1.5 would read oddly.
  """
  scores = _check_1d(scores, "scores", min_len=1)
  descending = np.sort(-scores)
  return (np.searchsorted(descending, -scores, side="left") + 1).astype(np.int64)


def orient(scores, higher_is_better: bool) -> np.ndarray:
  """Returns ``scores`` as a float 1-D array in which larger means "predicted better".

  Args:
    scores: one score per candidate.
    higher_is_better: whether a larger raw score already means a better candidate. Pass False for
      distances such as the Gromov-Wasserstein distance, whose scores are then negated.
  """
  arr = _check_1d(scores, "scores", min_len=1)
  return arr if higher_is_better else -arr


def pearson(x, y) -> float:
  """Pearson's correlation coefficient r between ``x`` and ``y`` (as scipy.stats.pearsonr).

  Returns NaN, without a warning, when either input is constant.
  """
  x, y = _check_pair(x, y, "x", "y")
  if _is_constant(x) or _is_constant(y):
    return float("nan")
  dx = x - x.mean()
  dy = y - y.mean()
  # Dividing by the largest deviation first keeps the squared norms clear of overflow/underflow.
  dx /= np.abs(dx).max()
  dy /= np.abs(dy).max()
  r = np.dot(dx / np.linalg.norm(dx), dy / np.linalg.norm(dy))
  # Round-off can push |r| a hair past 1 for exactly linear data.
  return float(np.clip(r, -1.0, 1.0))


def _average_ranks(a: np.ndarray) -> np.ndarray:
  """1-based ranks of ``a`` with ties given the mean of the ranks they span (scipy "average")."""
  n = a.size
  order = np.argsort(a, kind="stable")
  sorted_a = a[order]
  starts_group = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
  group = np.cumsum(starts_group) - 1
  starts = np.flatnonzero(starts_group)
  ends = np.append(starts[1:], n)  # exclusive
  # Positions start..end-1 (0-based) have mean rank (start + end - 1) / 2 + 1 when 1-based.
  mean_rank = (starts + ends - 1) / 2.0 + 1.0
  ranks = np.empty(n)
  ranks[order] = mean_rank[group]
  return ranks


def spearman(x, y) -> float:
  """Spearman's rank correlation rho: Pearson's r of the average ranks (as scipy.stats.spearmanr).

  Returns NaN, without a warning, when either input is constant.
  """
  x, y = _check_pair(x, y, "x", "y")
  if _is_constant(x) or _is_constant(y):
    return float("nan")
  return pearson(_average_ranks(x), _average_ranks(y))


def _sign_matrix(a: np.ndarray) -> np.ndarray:
  """The n×n matrix sign(a_i − a_j) as int8 (int8 keeps n in the thousands cheap in memory)."""
  return np.sign(a[:, None] - a[None, :]).astype(np.int8)


def kendall(x, y) -> float:
  """Kendall's tau-b between ``x`` and ``y`` (as scipy.stats.kendalltau's default variant).

  tau-b = (C − D) / sqrt((P − T_x)(P − T_y)) with C/D the concordant/discordant pairs, P all
  pairs and T_x/T_y the pairs tied in x/y. Returns NaN, without a warning, when either input is
  constant. O(n²) time and memory.
  """
  x, y = _check_pair(x, y, "x", "y")
  if _is_constant(x) or _is_constant(y):
    return float("nan")
  sx = _sign_matrix(x)
  sy = _sign_matrix(y)
  # Over ordered pairs every unordered pair counts twice in each sum, so the ratio is unchanged.
  numerator = np.sum(sx * sy, dtype=np.int64)
  untied_x = np.count_nonzero(sx)
  untied_y = np.count_nonzero(sy)
  tau = numerator / np.sqrt(float(untied_x) * float(untied_y))
  return float(np.clip(tau, -1.0, 1.0))


def _weighted_tau_ranked_by(x: np.ndarray, y: np.ndarray) -> float:
  """Vigna's additive hyperbolic weighted tau with the decreasing lexicographic rank by (x, y)."""
  n = x.size
  # Rank 0 (the most important) goes to the largest x, larger y breaking ties in x. Candidates
  # tied in both x and y get distinct ranks in some order; the additive statistic does not depend
  # on that order, since such candidates stand in the same relation to every other candidate.
  decreasing = np.lexsort((y, x))[::-1]
  rank = np.empty(n, dtype=np.int64)
  rank[decreasing] = np.arange(n)
  w = 1.0 / (rank + 1.0)
  pair_weight = w[:, None] + w[None, :]
  sx = _sign_matrix(x)
  sy = _sign_matrix(y)
  # Concordant pairs add their weight, discordant pairs subtract it, pairs tied in x or y add 0.
  numerator = np.sum(pair_weight * (sx * sy))
  untied_x = np.sum(pair_weight[sx != 0])
  untied_y = np.sum(pair_weight[sy != 0])
  tau = numerator / np.sqrt(untied_x) / np.sqrt(untied_y)
  return float(np.clip(tau, -1.0, 1.0))


def weighted_kendall_tau(x, y) -> float:
  """Vigna's weighted Kendall tau, as scipy.stats.weightedtau(x, y) with default arguments.

  Each pair (i, j) counts with weight 1/(r_i + 1) + 1/(r_j + 1), where r is a candidate's
  position (0 = most important) in a ranking, so swaps near the top matter more than swaps near
  the bottom:

    tau_w = sum_ij w_ij sgn(x_i − x_j) sgn(y_i − y_j)
            / sqrt(sum_{x_i≠x_j} w_ij · sum_{y_i≠y_j} w_ij).

  As scipy's ``rank=True``, the result is the mean of tau_w under the decreasing lexicographic
  ranking by (x, y) and under the one by (y, x). Returns NaN, without a warning, when either
  input is constant. O(n²) time and memory (fine for n up to a few thousand).
  """
  x, y = _check_pair(x, y, "x", "y")
  if _is_constant(x) or _is_constant(y):
    return float("nan")
  return (_weighted_tau_ranked_by(x, y) + _weighted_tau_ranked_by(y, x)) / 2.0


def r2(x, y) -> float:
  """R² of the least-squares line predicting ``y`` from ``x``; equal to ``pearson(x, y) ** 2``.

  This is the paper convention for "R² between scores and accuracy": the fraction of the
  variance in accuracy explained by a linear fit on the score. It is symmetric in x and y, and
  blind to the sign of the relation (a score anticorrelated with accuracy also gets a high R²),
  so read it together with ``pearson``. Returns NaN, without a warning, when either input is
  constant.
  """
  return pearson(x, y) ** 2


def ndcg_at_k(relevance, scores, k: int) -> float:
  """Normalised discounted cumulative gain at ``k`` of ranking by ``scores`` (one query).

  Follows ``sklearn.metrics.ndcg_score([relevance], [scores], k=k)`` (ignore_ties=False): the gain
  at ranked position p (0-based) is discounted by 1/log2(p + 2) for p < k and by 0 beyond; when
  several candidates share a score, each position of the tied block gets the mean relevance of
  the block, which is the expected DCG over all orders of the tie. The DCG is divided by the DCG
  of the ideal ranking (relevance sorted in decreasing order). When every relevance is 0 the ideal
  DCG is 0 and the result is 0.0, as in scikit-learn.

  Args:
    relevance: the true gain of each candidate (e.g. its accuracy); must be non-negative.
    scores: the predicted score of each candidate; larger ranks higher.
    k: the number of top positions that count; values above the number of candidates are clamped.

  Returns:
    NDCG@k in [0, 1].
  """
  relevance, scores = _check_pair(relevance, scores, "relevance", "scores")
  if np.any(relevance < 0):
    raise ValueError("relevance: NDCG needs non-negative gains, got a minimum of "
                     f"{relevance.min():g}")
  n = relevance.size
  k = _check_k(k, n)
  discount = 1.0 / np.log2(np.arange(n) + 2.0)
  discount[k:] = 0.0

  ideal = float(np.dot(np.sort(relevance)[::-1], discount))
  if ideal == 0.0:
    return 0.0

  # Decreasing score, and by relevance within a tied block: the block's mean gain is then summed
  # in an order that does not depend on how the candidates were listed.
  order = np.lexsort((relevance, -scores))
  sorted_scores = scores[order]
  block_starts = np.flatnonzero(
      np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]]))
  block_sizes = np.diff(np.append(block_starts, n))
  block_mean_gain = np.add.reduceat(relevance[order], block_starts) / block_sizes
  block_discount = np.add.reduceat(discount, block_starts)
  dcg = float(np.dot(block_mean_gain, block_discount))
  return dcg / ideal


def recall_at_k(true, predicted, k: int) -> float:
  """The probability that a candidate with the best ``true`` value is in the top ``k`` by
  ``predicted``, over uniformly random orders of candidates tied in ``predicted``.

  Without ties in ``predicted`` this is 1.0 on a hit and 0.0 on a miss. Ties in ``true``: if
  several candidates share the best true value, any one of them in the top k counts as a hit.
  A tied group of g candidates of which b are best, with s of its places inside the top k,
  misses them all with probability C(g − b, s) / C(g, s) (drawing s of g without replacement).
  ``k`` above the number of candidates is clamped (and then always gives 1.0).

  Returns:
    The expected hit, in [0, 1].
  """
  true, predicted = _check_pair(true, predicted, "true", "predicted")
  k = _check_k(k, true.size)
  is_best = true == true.max()
  miss = fractions.Fraction(1)
  # A tied group with no best candidate misses surely (factor 1): only the best ones' groups count.
  for value in np.unique(predicted[is_best]):
    group = predicted == value
    g = int(group.sum())
    s = int(np.clip(k - np.count_nonzero(predicted > value), 0, g))
    b = int(np.count_nonzero(is_best & group))
    # Exact rational arithmetic, rounded once: a constant score over 3 candidates with one best
    # gives exactly float(1/3), not 1 − float(2/3).
    miss *= fractions.Fraction(math.comb(g - b, s), math.comb(g, s))
  return float(1 - miss)


def top_k_overlap(true, predicted, k: int) -> float:
  """E|top-k(true) ∩ top-k(predicted)| / k: the fraction of the truly best k that was predicted.

  Ties in either input are ordered uniformly at random, independently, so the expected overlap
  is sum_i P(i in top-k(true)) · P(i in top-k(predicted)) / k. ``k`` above the number of
  candidates is clamped, and the result is then divided by the clamped k (so it is 1.0).
  """
  true, predicted = _check_pair(true, predicted, "true", "predicted")
  k = _check_k(k, true.size)
  both = _top_k_probabilities(true, k) * _top_k_probabilities(predicted, k)
  # Summed in sorted order so that the round-off, too, is the same for every candidate order.
  return float(np.sort(both).sum() / k)


def top1_regret(true, predicted) -> float:
  """Accuracy lost by picking the predicted best: max(true) − true[pick] ≥ 0, in expectation.

  When several candidates tie for the largest ``predicted`` value the pick is each of them with
  equal probability, so the regret is the mean of max(true) − true over that tied group (for a
  constant score, the mean shortfall of all candidates).
  """
  true, predicted = _check_pair(true, predicted, "true", "predicted")
  # The mean of non-negative shortfalls, not max − mean(true): that cannot round below zero.
  # Sorted so that the round-off, too, is the same for every candidate order.
  return float(np.mean(np.sort(true.max() - true[predicted == predicted.max()])))


def all_metrics(true, predicted, ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
  """Every metric of ``true`` (e.g. accuracy) against ``predicted`` (a score, larger = better).

  Keys: "pearson", "spearman", "kendall", "weighted_tau", "r2", then "ndcg@k" and "recall@k"
  for each k in ``ks``, then "top1_regret". A k above the number of candidates is clamped to it
  while the key keeps the requested k (with 3 candidates, "ndcg@5" is NDCG@3). NDCG uses
  ``true`` as the gains, so ``true`` must be non-negative. Correlations are NaN for constant
  inputs. Ties count as ties (module docstring): the result does not depend on the order of the
  candidates, to the bit.
  """
  true, predicted = _check_pair(true, predicted, "true", "predicted")
  # Every metric is invariant to listing the candidates in another order, but float sums are
  # not: sorting the pairs first makes the values bit-identical for every input order.
  canonical = np.lexsort((true, predicted))
  true, predicted = true[canonical], predicted[canonical]
  out = {
      "pearson": pearson(predicted, true),
      "spearman": spearman(predicted, true),
      "kendall": kendall(predicted, true),
      "weighted_tau": weighted_kendall_tau(predicted, true),
      "r2": r2(predicted, true),
  }
  for k in ks:
    out[f"ndcg@{k}"] = ndcg_at_k(true, predicted, k)
  for k in ks:
    out[f"recall@{k}"] = recall_at_k(true, predicted, k)
  out["top1_regret"] = top1_regret(true, predicted)
  return out
