"""Tests for vlmsel_jax.scoring.metrics against scipy / scikit-learn and hand-computed values."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import ndcg_score

from vlmsel_jax.scoring import metrics

TOL = 1e-10
SIZES = (3, 5, 20, 100)


def _random_pairs():
  """Seeded (x, y) pairs: continuous and heavily tied, at every size in SIZES."""
  rng = np.random.default_rng(1234)
  pairs = []
  for n in SIZES:
    for _ in range(4):
      pairs.append((f"cont-n{n}", rng.normal(size=n), rng.normal(size=n)))
      # Few distinct values, so ties in x, in y and in both are all common.
      pairs.append((f"ties-n{n}", rng.integers(0, 3, n).astype(float),
                    rng.integers(0, 4, n).astype(float)))
    # Correlated data so that large |correlation| values are also exercised.
    x = rng.normal(size=n)
    pairs.append((f"corr-n{n}", x, 0.8 * x + 0.2 * rng.normal(size=n)))
  return pairs


PAIRS = _random_pairs()
PAIR_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(PAIRS)]


def _scipy_ref(fn, x, y) -> float:
  # scipy warns on constant input; the reference value (NaN) is what matters here.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = fn(x, y)
  return float(res.statistic if hasattr(res, "statistic") else res[0])


def _assert_same(ours: float, ref: float, tol: float = TOL):
  if math.isnan(ref):
    assert math.isnan(ours), f"expected NaN, got {ours}"
  else:
    assert abs(ours - ref) <= tol, f"{ours} vs reference {ref} (diff {abs(ours - ref):.3g})"


def _ranked(a, tiebreak=None) -> list[int]:
  """Plain-python reference ranking: decreasing value, ties in ``tiebreak`` order (or index)."""
  tiebreak = range(len(a)) if tiebreak is None else tiebreak
  return sorted(range(len(a)), key=lambda i: (-a[i], tiebreak[i]))


def _top_k_reference(true, predicted, k, orders):
  """(recall@k, top-k overlap, top-1 regret) averaged over tie-breaking orders, plain python.

  ``orders`` holds (true tie-break, predicted tie-break) pairs; all pairs of permutations give
  the exact expectation over uniformly random tie orders, random pairs an estimate of it.
  """
  n = len(true)
  kc = min(k, n)
  best = max(true)
  recall = overlap = regret = 0.0
  for true_tiebreak, pred_tiebreak in orders:
    pred_order = _ranked(predicted, pred_tiebreak)
    true_order = _ranked(true, true_tiebreak)
    recall += float(any(true[i] == best for i in pred_order[:kc]))
    overlap += len(set(true_order[:kc]) & set(pred_order[:kc])) / kc
    regret += best - true[pred_order[0]]
  return recall / len(orders), overlap / len(orders), regret / len(orders)


# --- agreement with scipy / scikit-learn on random data ---------------------------------------


@pytest.mark.parametrize("x,y", [(x, y) for _, x, y in PAIRS], ids=PAIR_IDS)
def test_correlations_match_scipy(x, y):
  with warnings.catch_warnings():
    # Our functions must never warn, even where scipy would (constant inputs).
    warnings.simplefilter("error")
    ours = {
        "pearson": metrics.pearson(x, y),
        "spearman": metrics.spearman(x, y),
        "kendall": metrics.kendall(x, y),
        "weighted_tau": metrics.weighted_kendall_tau(x, y),
        "r2": metrics.r2(x, y),
    }
  pearson_ref = _scipy_ref(scipy.stats.pearsonr, x, y)
  refs = {
      "pearson": pearson_ref,
      "spearman": _scipy_ref(scipy.stats.spearmanr, x, y),
      "kendall": _scipy_ref(scipy.stats.kendalltau, x, y),
      "weighted_tau": _scipy_ref(scipy.stats.weightedtau, x, y),
      "r2": pearson_ref ** 2,
  }
  for key, ref in refs.items():
    _assert_same(ours[key], ref)


def test_random_pairs_include_ties_and_nonconstant_cases():
  # Guards the fixture itself: the tied cases must really contain ties and most must give
  # finite correlations, otherwise the comparisons above would only test NaN == NaN.
  tied = [(x, y) for name, x, y in PAIRS if name.startswith("ties")]
  assert all(np.unique(x).size < x.size for x, _ in tied)
  finite = [not math.isnan(metrics.kendall(x, y)) for x, y in tied]
  assert sum(finite) >= len(tied) - 2


def test_r2_matches_least_squares_fit():
  rng = np.random.default_rng(7)
  x = rng.normal(size=30)
  y = 2.0 * x + rng.normal(size=30)
  fit = scipy.stats.linregress(x, y)
  residual = y - (fit.intercept + fit.slope * x)
  r2_fit = 1.0 - np.sum(residual ** 2) / np.sum((y - y.mean()) ** 2)
  assert abs(metrics.r2(x, y) - r2_fit) <= TOL


@pytest.mark.parametrize("x,y", [(x, y) for _, x, y in PAIRS], ids=PAIR_IDS)
def test_ndcg_matches_sklearn(x, y):
  relevance = np.abs(y)  # sklearn requires non-negative gains
  n = x.size
  for k in (1, 2, 3, 5, 10, n, n + 3):
    ref = ndcg_score([relevance], [x], k=k)
    ours = metrics.ndcg_at_k(relevance, x, k)
    assert abs(ours - ref) <= 1e-12, (k, ours, ref)


def test_ndcg_matches_sklearn_with_ties_in_both_inputs():
  rng = np.random.default_rng(99)
  for n in SIZES:
    for _ in range(5):
      relevance = rng.integers(0, 3, n).astype(float)
      scores = rng.integers(0, 3, n).astype(float)
      for k in (1, 3, 5, n):
        ref = ndcg_score([relevance], [scores], k=k)
        assert abs(metrics.ndcg_at_k(relevance, scores, k) - ref) <= 1e-12


@pytest.mark.parametrize("n", SIZES)
def test_top_k_metrics_match_plain_python_reference(n):
  rng = np.random.default_rng(n)
  if n <= 5:
    # Every pair of tie-breaking permutations: the exact expectation over random tie orders.
    perms = list(itertools.permutations(range(n)))
    orders = [(a, b) for a in perms for b in perms]
  else:
    # Too many permutations: a seeded sample estimates the expectation (std ≤ 0.5/sqrt(2000)).
    orders = [(rng.permutation(n), rng.permutation(n)) for _ in range(2000)]
  for trial in range(10):
    if trial % 2:
      true = rng.integers(0, 3, n).astype(float)
      predicted = rng.integers(0, 3, n).astype(float)
    else:
      true = rng.uniform(size=n)
      predicted = rng.normal(size=n)
    tied = trial % 2 == 1
    # Without ties any one order is the whole expectation.
    use = orders if tied else orders[:1]
    tol = 1e-12 if n <= 5 or not tied else 0.05
    for k in (1, 2, 3, 5):
      recall, overlap, _ = _top_k_reference(true, predicted, k, use)
      assert metrics.recall_at_k(true, predicted, k) == pytest.approx(recall, abs=tol), k
      assert metrics.top_k_overlap(true, predicted, k) == pytest.approx(overlap, abs=tol), k
    _, _, want_regret = _top_k_reference(true, predicted, 1, use)
    regret = metrics.top1_regret(true, predicted)
    assert regret == pytest.approx(want_regret, abs=tol)
    assert regret >= 0.0
    # Expected recall@1 is 1 exactly when every pick is a best candidate, i.e. nothing is lost.
    assert (metrics.recall_at_k(true, predicted, 1) == 1.0) == (regret == 0.0)


# The candidate order must never matter: ties are ties, not "lower index first".
TIED_CASES = [
    ("constant", [0.3, 0.9, 0.5, 0.1, 0.6], [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("tie-at-top", [0.5, 0.6, 0.9, 0.2, 0.7], [2.0, 2.0, 2.0, 1.0, 0.0]),
    ("tie-straddles-k", [0.5, 0.6, 0.9, 0.2, 0.7], [3.0, 2.0, 2.0, 2.0, 1.0]),
    ("ties-in-both", [0.9, 0.9, 0.4, 0.4, 0.1], [1.0, 0.0, 1.0, 0.0, 1.0]),
    ("tied-truth-only", [0.9, 0.9, 0.5, 0.5, 0.2], [0.3, 0.1, 0.7, 0.2, 0.5]),
]


@pytest.mark.parametrize("true, predicted", [c[1:] for c in TIED_CASES],
                         ids=[c[0] for c in TIED_CASES])
def test_permuting_the_candidates_never_changes_any_metric(true, predicted):
  true, predicted = np.array(true), np.array(predicted)
  want = metrics.all_metrics(true, predicted, ks=(1, 2, 3, 5))
  singles = {k: (metrics.recall_at_k(true, predicted, k), metrics.top_k_overlap(true, predicted, k),
                 metrics.ndcg_at_k(true, predicted, k)) for k in (1, 2, 3)}
  for perm in itertools.permutations(range(true.size)):
    perm = list(perm)
    got = metrics.all_metrics(true[perm], predicted[perm], ks=(1, 2, 3, 5))
    # all_metrics sorts the pairs first, so even the float round-off is the same.
    assert got.keys() == want.keys()
    for key, value in got.items():
      assert value == want[key] or (math.isnan(value) and math.isnan(want[key])), (perm, key)
    for k, (recall, overlap, ndcg) in singles.items():
      assert metrics.recall_at_k(true[perm], predicted[perm], k) == recall
      assert metrics.top_k_overlap(true[perm], predicted[perm], k) == overlap
      assert metrics.ndcg_at_k(true[perm], predicted[perm], k) == ndcg
    assert metrics.top1_regret(true[perm], predicted[perm]) == want["top1_regret"]


def test_constant_score_closed_form():
  true = [0.3, 0.9, 0.5, 0.1]
  constant = [0.7] * 4
  # One best of 4: in the top k with probability k/4; the pick is each candidate equally.
  assert [metrics.recall_at_k(true, constant, k) for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
  assert metrics.top1_regret(true, constant) == pytest.approx((0.6 + 0.0 + 0.4 + 0.8) / 4)
  # Every candidate is in the predicted top 2 with probability 1/2; the true top 2 is {1, 2}.
  assert metrics.top_k_overlap(true, constant, 2) == pytest.approx(0.5)
  # Two best of 4: recall@1 = 2/4, recall@2 = 1 − C(2, 2)/C(4, 2) = 5/6.
  assert metrics.recall_at_k([0.9, 0.9, 0.1, 0.1], constant, 1) == 0.5
  assert metrics.recall_at_k([0.9, 0.9, 0.1, 0.1], constant, 2) == pytest.approx(5.0 / 6.0)
  np.testing.assert_array_equal(metrics.top_group(constant), [0, 1, 2, 3])


def test_partially_tied_score_closed_form():
  true = [0.5, 0.6, 0.9, 0.2, 0.7]  # candidate 2 is the best
  # Candidates 0, 1, 2 tie for the top: the pick is each with probability 1/3.
  top_tie = [2.0, 2.0, 2.0, 1.0, 0.0]
  assert metrics.top1_regret(true, top_tie) == pytest.approx((0.4 + 0.3 + 0.0) / 3)
  assert metrics.recall_at_k(true, top_tie, 1) == pytest.approx(1.0 / 3.0)
  assert metrics.recall_at_k(true, top_tie, 2) == pytest.approx(2.0 / 3.0)
  assert metrics.recall_at_k(true, top_tie, 3) == 1.0
  # True top 2 is {2, 4}; candidate 2 is in the predicted top 2 with probability 2/3, 4 never.
  assert metrics.top_k_overlap(true, top_tie, 2) == pytest.approx((2.0 / 3.0) / 2)
  np.testing.assert_array_equal(metrics.top_group(top_tie), [0, 1, 2])
  # Candidate 0 alone on top, then 1, 2, 3 tied: a cutoff inside the tie is a partial hit.
  straddle = [3.0, 2.0, 2.0, 2.0, 1.0]
  assert metrics.top1_regret(true, straddle) == pytest.approx(0.4)
  assert metrics.recall_at_k(true, straddle, 1) == 0.0
  assert metrics.recall_at_k(true, straddle, 2) == pytest.approx(1.0 / 3.0)   # 1 slot of 3
  assert metrics.recall_at_k(true, straddle, 3) == pytest.approx(2.0 / 3.0)   # 2 slots of 3
  assert metrics.recall_at_k(true, straddle, 4) == 1.0
  # NDCG already averages a tie's gains (scikit-learn's convention): it must still agree.
  for k in (1, 2, 3, 5):
    assert metrics.ndcg_at_k(true, straddle, k) == pytest.approx(
        ndcg_score([true], [straddle], k=k), abs=1e-12)


def test_competition_ranks_share_the_best_rank_of_a_tie():
  np.testing.assert_array_equal(metrics.competition_ranks([5.0, 7.0, 7.0, 1.0]), [3, 1, 1, 4])
  np.testing.assert_array_equal(metrics.competition_ranks([2.0, 2.0, 2.0]), [1, 1, 1])
  x = np.random.default_rng(0).integers(0, 4, 30).astype(float)
  np.testing.assert_array_equal(metrics.competition_ranks(x),
                                scipy.stats.rankdata(-x, method="min"))


# --- closed-form values -----------------------------------------------------------------------


@pytest.mark.parametrize("fn", [metrics.pearson, metrics.spearman, metrics.kendall,
                                metrics.weighted_kendall_tau])
def test_identical_and_reversed_rankings(fn):
  x = np.array([0.1, 0.5, 0.2, 0.9, 0.7])
  assert fn(x, x) == pytest.approx(1.0, abs=1e-12)
  assert fn(x, -x) == pytest.approx(-1.0, abs=1e-12)


def test_monotone_transform_keeps_rank_correlations_at_one():
  x = np.array([0.3, 1.0, 2.5, 4.0, 9.0])
  y = np.exp(x)  # same order, very nonlinear
  assert metrics.spearman(x, y) == pytest.approx(1.0, abs=1e-12)
  assert metrics.kendall(x, y) == pytest.approx(1.0, abs=1e-12)
  assert metrics.weighted_kendall_tau(x, y) == pytest.approx(1.0, abs=1e-12)
  assert metrics.pearson(x, y) < 0.99


def test_weighted_tau_documented_scipy_example():
  # Value printed in scipy.stats.weightedtau's docstring example.
  x = [12, 2, 1, 12, 2]
  y = [1, 4, 7, 1, 0]
  assert metrics.weighted_kendall_tau(x, y) == pytest.approx(-0.56694968153682723, abs=1e-12)


def test_weighted_tau_weighs_top_swaps_more_than_bottom_swaps():
  truth = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
  swap_top = np.array([4.0, 5.0, 3.0, 2.0, 1.0])
  swap_bottom = np.array([5.0, 4.0, 3.0, 1.0, 2.0])
  # Plain Kendall cannot tell the two apart; the weighted one must penalise the top swap more.
  assert metrics.kendall(truth, swap_top) == metrics.kendall(truth, swap_bottom)
  assert metrics.weighted_kendall_tau(truth, swap_top) < metrics.weighted_kendall_tau(
      truth, swap_bottom)


def test_ndcg_hand_computed_three_candidates():
  relevance = [1.0, 0.0, 2.0]
  scores = [3.0, 2.0, 1.0]  # ranks the candidates 0, 1, 2
  dcg = 1.0 / math.log2(2) + 0.0 / math.log2(3) + 2.0 / math.log2(4)  # = 2
  ideal = 2.0 / math.log2(2) + 1.0 / math.log2(3) + 0.0 / math.log2(4)
  assert metrics.ndcg_at_k(relevance, scores, 3) == pytest.approx(dcg / ideal, abs=1e-15)
  assert metrics.ndcg_at_k(relevance, scores, 1) == pytest.approx(1.0 / 2.0, abs=1e-15)
  # Candidates 0 and 1 tied at the top share positions 0 and 1 with their mean gain 0.5.
  tied = [1.0, 1.0, 0.0]
  dcg_tied = 0.5 * (1.0 + 1.0 / math.log2(3)) + 2.0 / math.log2(4)
  assert metrics.ndcg_at_k(relevance, tied, 3) == pytest.approx(dcg_tied / ideal, abs=1e-15)
  # The perfect ranking scores 1, and all-zero gains give 0 (scikit-learn's convention).
  assert metrics.ndcg_at_k(relevance, relevance, 3) == pytest.approx(1.0, abs=1e-15)
  assert metrics.ndcg_at_k([0.0, 0.0, 0.0], scores, 3) == 0.0


def test_recall_at_k_hand_built():
  true = [0.5, 0.9, 0.7, 0.6]
  predicted = [0.4, 0.2, 0.8, 0.1]  # predicted order: 2, 0, 1, 3; the best candidate is 1
  assert [metrics.recall_at_k(true, predicted, k) for k in (1, 2, 3, 4, 10)] == [
      0.0, 0.0, 1.0, 1.0, 1.0]
  # Two candidates share the best accuracy: either one in the top k is a hit.
  assert metrics.recall_at_k([0.9, 0.9, 0.1], [0.0, 1.0, 2.0], 1) == 0.0
  assert metrics.recall_at_k([0.9, 0.9, 0.1], [0.0, 1.0, 2.0], 2) == 1.0
  # Tied predictions are a coin flip whichever index the best has (was 0.0 and 1.0 when the
  # lower index won a tie: the result depended on the order the candidates were listed in).
  assert metrics.recall_at_k([0.1, 0.9, 0.5], [1.0, 1.0, 0.0], 1) == 0.5
  assert metrics.recall_at_k([0.9, 0.1, 0.5], [1.0, 1.0, 0.0], 1) == 0.5


def test_top_k_overlap_and_regret_hand_built():
  true = [5.0, 4.0, 3.0, 2.0, 1.0]
  predicted = [1.0, 5.0, 4.0, 2.0, 3.0]  # top-2 predicted {1, 2} vs true {0, 1}
  assert metrics.top_k_overlap(true, predicted, 2) == 0.5
  # top-3 predicted {1, 2, 4} vs true {0, 1, 2}
  assert metrics.top_k_overlap(true, predicted, 3) == pytest.approx(2.0 / 3.0)
  assert metrics.top_k_overlap(true, predicted, 5) == 1.0
  assert metrics.top_k_overlap(true, predicted, 50) == 1.0
  assert metrics.top1_regret(true, predicted) == 1.0  # picked candidate 1 (4.0), best is 5.0
  assert metrics.top1_regret(true, true) == 0.0
  assert metrics.top1_regret([0.2, 0.8, 0.5], [0.0, 3.0, 1.0]) == 0.0


def test_orient_flips_lower_is_better_scores():
  gw_distance = [0.3, 0.1, 0.2]  # candidate 1 is predicted best
  oriented = metrics.orient(gw_distance, higher_is_better=False)
  np.testing.assert_array_equal(oriented, [-0.3, -0.1, -0.2])
  assert metrics.top1_regret([0.5, 0.9, 0.7], oriented) == 0.0
  np.testing.assert_array_equal(metrics.orient(gw_distance, higher_is_better=True), gw_distance)


def test_all_metrics_keys_values_and_k_clamping():
  rng = np.random.default_rng(3)
  true = rng.uniform(size=8)
  predicted = true + 0.3 * rng.normal(size=8)
  out = metrics.all_metrics(true, predicted)
  assert list(out) == ["pearson", "spearman", "kendall", "weighted_tau", "r2", "ndcg@1",
                       "ndcg@3", "ndcg@5", "recall@1", "recall@3", "recall@5", "top1_regret"]
  assert all(isinstance(v, float) for v in out.values())
  assert out["pearson"] == metrics.pearson(true, predicted)
  assert out["weighted_tau"] == pytest.approx(
      scipy.stats.weightedtau(predicted, true).statistic, abs=TOL)
  assert out["ndcg@3"] == pytest.approx(ndcg_score([true], [predicted], k=3), abs=1e-12)
  assert out["recall@5"] == metrics.recall_at_k(true, predicted, 5)
  assert out["top1_regret"] == metrics.top1_regret(true, predicted)

  # Three candidates: k = 5 is clamped to 3 but keeps its key.
  small = metrics.all_metrics([0.2, 0.6, 0.4], [1.0, 0.0, 2.0])
  assert small["ndcg@5"] == small["ndcg@3"] == pytest.approx(
      ndcg_score([[0.2, 0.6, 0.4]], [[1.0, 0.0, 2.0]], k=3), abs=1e-12)
  assert small["recall@5"] == 1.0
  assert small["recall@1"] == 0.0


# --- degenerate and invalid input -------------------------------------------------------------


@pytest.mark.parametrize("fn", [metrics.pearson, metrics.spearman, metrics.kendall,
                                metrics.weighted_kendall_tau, metrics.r2])
def test_constant_input_gives_nan_without_warnings(fn):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    # 0.1 * 3 copies: the float mean of identical values can round off the value itself.
    assert math.isnan(fn([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]))
    assert math.isnan(fn([1.0, 2.0, 3.0], [0.7, 0.7, 0.7]))


def test_all_metrics_on_constant_predictions():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = metrics.all_metrics([0.2, 0.6, 0.4], [1.0, 1.0, 1.0])
  assert math.isnan(out["pearson"]) and math.isnan(out["weighted_tau"])
  # All tied: each candidate is the pick with probability 1/3 (was 0.4, index 0's shortfall,
  # when the lower index won the tie), and the one best is in the top 1 with probability 1/3.
  assert out["top1_regret"] == pytest.approx((0.4 + 0.0 + 0.2) / 3)
  assert out["recall@1"] == pytest.approx(1.0 / 3.0)
  assert out["ndcg@3"] == pytest.approx(ndcg_score([[0.2, 0.6, 0.4]], [[1.0, 1.0, 1.0]], k=3))


@pytest.mark.parametrize("fn", [metrics.pearson, metrics.spearman, metrics.kendall,
                                metrics.weighted_kendall_tau, metrics.r2, metrics.top1_regret])
def test_invalid_input_messages(fn):
  with pytest.raises(ValueError, match=r"expected a 1-D array .*got shape \(2, 2\)"):
    fn(np.ones((2, 2)), np.ones((2, 2)))
  with pytest.raises(ValueError, match=r"has 3 candidates but .* has 4"):
    fn([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
  with pytest.raises(ValueError, match=r"needs at least 2 candidates, got 1"):
    fn([1.0], [2.0])
  with pytest.raises(ValueError, match=r"NaN values at 1 of 3 positions \(first at index 1\)"):
    fn([1.0, 2.0, 3.0], [1.0, float("nan"), 3.0])
  with pytest.raises(ValueError, match=r"Inf values at 1 of 3 positions"):
    fn([1.0, float("inf"), 3.0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match=r"expected real numbers"):
    fn(["a", "b", "c"], [1.0, 2.0, 3.0])


def test_invalid_k_and_negative_relevance():
  for fn in (metrics.ndcg_at_k, metrics.recall_at_k, metrics.top_k_overlap):
    for bad_k in (0, -1, 1.5, True):
      with pytest.raises(ValueError, match=r"k must be a positive integer"):
        fn([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], bad_k)
  with pytest.raises(ValueError, match=r"relevance: NDCG needs non-negative gains"):
    metrics.ndcg_at_k([0.1, -0.2, 0.3], [1.0, 2.0, 3.0], 2)
  with pytest.raises(ValueError, match=r"predicted: .*NaN"):
    metrics.all_metrics([0.1, 0.2, 0.3], [1.0, float("nan"), 3.0])
  with pytest.raises(ValueError, match=r"scores: expected a 1-D array"):
    metrics.orient(np.ones((2, 2)), higher_is_better=False)
