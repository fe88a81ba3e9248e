"""Uncertainty of scores, rankings and judgements: scipy equality, calibration, outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.stats
from absl import flags

from vlmsel_jax import score
from vlmsel_jax import select
from vlmsel_jax.scoring import metrics as rank_metrics
from vlmsel_jax.scoring import pool
from vlmsel_jax.scoring import report
from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scoring import uncertainty as unc
from vlmsel_jax.scores import cka
from vlmsel_jax.scores import distances

FLAGS = flags.FLAGS
SETTINGS = pool.ScoreSettings(knn_k=5)
# One sample count and one batch for every test, so that the compiled programs are shared.
N, BATCH = 48, unc.UncertaintyOptions().batch


@pytest.fixture(scope="module", name="small_pool")
def _small_pool():
  return synthetic.make_pool(n=N, seed=2)


def _sides(x, y):
  return (unc._Side(x, SETTINGS.distance, SETTINGS.knn_k, SETTINGS.rbf_sigma),
          unc._Side(y, SETTINGS.distance, SETTINGS.knn_k, SETTINGS.rbf_sigma))


# Independent recomputations of each score on resampled rows ``ids`` (the resample's origin of
# each row), with the rules the module docstring states: copies of one sample are not a pair
# (RSA) nor neighbours (k-NN); RBF bandwidth and CCA's PCA subspaces from the full sample.
def _rsa(x, y, ids, full_x, full_y):
  dx = np.asarray(distances.pairwise_distances(x, "angular"), np.float64)
  dy = np.asarray(distances.pairwise_distances(y, "angular"), np.float64)
  a, b = np.triu_indices(len(ids), 1)
  keep = ids[a] != ids[b]
  return scipy.stats.spearmanr(dx[a, b][keep], dy[a, b][keep])[0]


def _knn(x, y, ids, full_x, full_y, k=SETTINGS.knn_k):
  def neighbours(z):
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = u @ u.T
    sim[ids[:, None] == ids[None, :]] = -np.inf
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]
  nx, ny = neighbours(np.asarray(x, np.float64)), neighbours(np.asarray(y, np.float64))
  return sum(len(set(nx[i]) & set(ny[i])) for i in range(len(ids))) / (len(ids) * k)


def _rbf(x, y, ids, full_x, full_y):
  def gram(z, full):
    d2 = ((full[:, None, :] - full[None, :, :]) ** 2).sum(-1)
    bandwidth = SETTINGS.rbf_sigma ** 2 * np.median(d2)
    return np.exp(-d2[np.ix_(ids, ids)] / (2 * bandwidth))
  k, l = gram(x, np.asarray(full_x, np.float64)), gram(y, np.asarray(full_y, np.float64))
  h = np.eye(len(ids)) - 1.0 / len(ids)
  kc, lc = h @ k @ h, h @ l @ h
  return (kc * lc).sum() / np.linalg.norm(kc) / np.linalg.norm(lc)


def _cca(x, y, ids, full_x, full_y):
  def basis(full):
    u, s, _ = np.linalg.svd(full - full.mean(0), full_matrices=False)
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    keep = min(int(np.searchsorted(share, SETTINGS.cca_pca_variance - 1e-6)) + 1,
               (len(full) - 1) // 2)
    z = u[ids, :keep]
    return np.linalg.qr(z - z.mean(0))[0]
  qx, qy = basis(np.asarray(full_x, np.float64)), basis(np.asarray(full_y, np.float64))
  return np.linalg.svd(qx.T @ qy, compute_uv=False).mean()


REFERENCES = {
    "cka": lambda x, y, *_: cka.linear_cka(x, y),
    "cka_debiased": lambda x, y, *_: cka.debiased_linear_cka(x, y),
    "cka_rbf": _rbf, "rsa": _rsa, "mutual_knn": _knn, "cca": _cca,
}


@pytest.mark.parametrize("metric", sorted(REFERENCES))
def test_bootstrap_interval_equals_scipy_on_the_same_resamples(small_pool, metric):
  x, y = small_pool.candidates[3], small_pool.text
  n, resamples, seed = len(y), 60, 7
  counts_ = unc.counts(unc.bootstrap_indices(n, resamples, seed), n)
  boot, _ = unc.cheap_replicates(metric, *_sides(x, y), counts_=counts_, pairings=None,
                                 settings=SETTINGS, batch=BATCH)

  def statistic(i):
    i = np.asarray(i, int)
    return REFERENCES[metric](x[i], y[i], i, x, y)

  res = scipy.stats.bootstrap((np.arange(n),), statistic, vectorized=False, n_resamples=resamples,
                              method="percentile", confidence_level=0.9,
                              rng=np.random.default_rng(seed))
  # Same resamples, replicate by replicate (float32 scores against float64 references).
  np.testing.assert_allclose(boot, res.bootstrap_distribution, atol=2e-5)
  low, high = unc.percentile_interval(boot, 0.9)
  assert low == pytest.approx(res.confidence_interval.low, abs=2e-5)
  assert high == pytest.approx(res.confidence_interval.high, abs=2e-5)


def test_mutual_knn_window_is_exact_when_it_truncates():
  """n = 160 > the window (4k + 64 = 84): replicates still equal the full recomputation."""
  p = synthetic.make_pool(n=160, seed=4)
  x, y = p.candidates[6], p.text
  indices = unc.bootstrap_indices(160, 6, 1)
  boot, _ = unc.cheap_replicates("mutual_knn", *_sides(x, y), counts_=unc.counts(indices, 160),
                                 pairings=None, settings=SETTINGS, batch=6)
  assert unc.knn_window(160, SETTINGS.knn_k) < 159
  want = [_knn(x[i], y[i], i, x, y) for i in indices]
  np.testing.assert_allclose(boot, want, atol=1e-6)


@pytest.mark.parametrize("metric", ["cka", "rsa", "mutual_knn"])
def test_permutation_p_value_equals_scipy(small_pool, metric):
  x, y = small_pool.candidates[10], small_pool.text  # Heavily damaged: p off the floor.
  n, permutations, seed = len(y), 99, 3
  fn = pool.METRICS[metric].fn
  pairings = unc.relative_pairings(unc.pairing_permutations(n, permutations, seed))
  _, null = unc.cheap_replicates(metric, *_sides(x, y), counts_=None,
                                 pairings=pairings.astype(np.int32), settings=SETTINGS,
                                 batch=BATCH)
  observed = fn(x, y, SETTINGS)
  res = scipy.stats.permutation_test(
      (np.arange(n), np.arange(n)), lambda i, j: fn(x[np.asarray(i, int)], y[np.asarray(j, int)],
                                                    SETTINGS),
      permutation_type="pairings", vectorized=False, n_resamples=permutations,
      alternative="greater", rng=np.random.default_rng(seed))
  np.testing.assert_allclose(null, res.null_distribution, atol=1e-6)
  assert unc.permutation_p_value(observed, null) == pytest.approx(res.pvalue, abs=1e-12)


def test_p_values_are_uniform_without_shared_structure():
  """Independent image and text rows: each score's p-value is uniform (KS at level 0.002)."""
  rng = np.random.default_rng(0)
  p_values = {m: [] for m in ("cka", "rsa", "mutual_knn")}
  for trial in range(100):
    x, y = rng.standard_normal((N, 6)), rng.standard_normal((N, 5))
    pairings = unc.relative_pairings(unc.pairing_permutations(N, 99, trial)).astype(np.int32)
    sides = _sides(x, y)
    for m in p_values:
      _, null = unc.cheap_replicates(m, *sides, counts_=None, pairings=pairings,
                                     settings=SETTINGS, batch=BATCH)
      p_values[m].append(unc.permutation_p_value(pool.METRICS[m].fn(x, y, SETTINGS), null))
  for m, ps in p_values.items():
    # Three tests at 0.002: a false alarm about once in 170 runs; a miscalibrated null (e.g. a
    # null computed unlike the observed score) fails by orders of magnitude.
    assert scipy.stats.kstest(ps, "uniform").pvalue > 0.002, m


def test_synthetic_pool_isometric_is_at_the_floor_and_resolved_from_the_worst():
  p = synthetic.make_pool(n=N, seed=0)
  keep = [p.names.index(c) for c in ("isometric", "noise_0.6", "drop_8", "random")]
  names = [p.names[i] for i in keep]
  options = unc.UncertaintyOptions(bootstrap=100, permutations=49, seed=1, gw_bootstrap=0)
  # The metrics whose programs the tests above compiled already (CCA's costs a compile more).
  metrics = ["cka", "cka_debiased", "rsa", "mutual_knn"]
  result = pool.score_pool(names, [p.candidates[i] for i in keep], p.text, metrics, SETTINGS,
                           ground_truth={c: float(p.quality[i]) for c, i in zip(names, keep)},
                           show_progress=False, uncertainty=options)
  iso, worst = names.index("isometric"), names.index("random")
  for m in metrics:
    u = result.uncertainty[m]
    assert u.p_value[iso] == pytest.approx(1 / 50), m
    assert u.ci_low[iso] > u.ci_high[worst], m
    assert u.ci_low[iso] <= result.values[m]["isometric"] <= u.ci_high[iso], m
    assert result.stability[m].resolved[iso, worst], m
    # The worst candidate scores like a shuffled pairing (calibrated score near 0).
    assert abs(u.calibrated[worst]) < 3.5 and u.calibrated[iso] > 5, m
  st = result.stability["cka"]
  assert st.p_top1.sum() == pytest.approx(1.0)
  assert result.unresolved("cka")[0][0] == "isometric"


def test_ranking_stability_and_groups():
  reps = np.array([[3.0, 2.9, 1.0], [2.0, 2.5, 0.9], [3.1, 3.0, 1.1], [2.8, 2.7, 1.0]] * 10)
  st = unc.ranking_stability(reps, higher_is_better=True, confidence=0.95)
  assert st.p_top1 == pytest.approx([0.75, 0.25, 0.0])
  assert not st.resolved[0, 1] and st.resolved[0, 2] and st.resolved[2, 1]
  groups = unc.unresolved_groups(["a", "b", "c"], [3.0, 2.9, 1.0], st.resolved, True)
  assert groups == [["a", "b"], ["c"]]
  # Lower is better: the same replicates negated give the same answer.
  st_low = unc.ranking_stability(-reps, higher_is_better=False, confidence=0.95)
  np.testing.assert_array_equal(st_low.resolved, st.resolved)
  assert st_low.p_top1 == pytest.approx(st.p_top1)


SCORES9 = np.array([0.31, 0.52, 0.18, 0.77, 0.64, 0.45, 0.29, 0.83, 0.58])
TRUTH9 = np.array([0.69, 0.72, 0.70, 0.74, 0.71, 0.70, 0.68, 0.73, 0.71])


@pytest.mark.parametrize("correlation", unc.CORRELATIONS)
def test_judgement_interval_and_p_value_equal_scipy(correlation):
  options = unc.UncertaintyOptions(bootstrap=300, permutations=199, seed=11)
  got = unc.judgement_uncertainty(SCORES9, TRUTH9, higher_is_better=True, options=options)
  fn = {"pearson": lambda a, b: scipy.stats.pearsonr(a, b)[0],
        "spearman": lambda a, b: scipy.stats.spearmanr(a, b)[0],
        "kendall": lambda a, b: scipy.stats.kendalltau(a, b)[0],
        "weighted_tau": lambda a, b: scipy.stats.weightedtau(a, b)[0]}[correlation]

  def statistic(i):
    i = np.asarray(i, int)
    with np.errstate(all="ignore"):
      return fn(SCORES9[i], TRUTH9[i])

  boot = scipy.stats.bootstrap((np.arange(9),), statistic, vectorized=False, n_resamples=300,
                               method="percentile", rng=np.random.default_rng(11))
  finite = boot.bootstrap_distribution[np.isfinite(boot.bootstrap_distribution)]
  low, high = np.quantile(finite, [0.025, 0.975])  # scipy's percentile rule, NaNs left out.
  assert got[f"{correlation}_ci_low"] == pytest.approx(low, abs=1e-9)
  assert got[f"{correlation}_ci_high"] == pytest.approx(high, abs=1e-9)
  perm = scipy.stats.permutation_test(
      (np.arange(9), np.arange(9)),
      lambda i, j: fn(SCORES9[np.asarray(i, int)], TRUTH9[np.asarray(j, int)]),
      permutation_type="pairings", vectorized=False, n_resamples=199, alternative="greater",
      rng=np.random.default_rng(11))
  assert got[f"{correlation}_p_value"] == pytest.approx(perm.pvalue, abs=1e-12)


def test_seed_noise_and_score_noise_widen_the_judgement_interval():
  options = unc.UncertaintyOptions(bootstrap=400, permutations=0, seed=0)
  plain = unc.judgement_uncertainty(SCORES9, TRUTH9, higher_is_better=True, options=options)
  noisy = unc.judgement_uncertainty(SCORES9, TRUTH9, higher_is_better=True, options=options,
                                    truth_sd=np.full(9, 0.02))
  width = lambda r: r["spearman_ci_high"] - r["spearman_ci_low"]
  assert width(noisy) > width(plain) + 0.05
  # Lower-is-better scores are flipped: negated scores judged as lower-is-better agree.
  flipped = unc.judgement_uncertainty(-SCORES9, TRUTH9, higher_is_better=False, options=options)
  assert flipped["spearman_ci_low"] == pytest.approx(plain["spearman_ci_low"])
  assert rank_metrics.top1_regret(TRUTH9, SCORES9) >= plain["top1_regret_ci_low"]


def test_score_binary_writes_every_interval(tmp_path):
  out = str(tmp_path / "out")
  FLAGS.unparse_flags()
  FLAGS(["score", "--synthetic_pool", f"--synthetic_n={N}", "--metrics=cka,rsa",
         "--noprogress", "--bootstrap=40", "--permutations=39", "--confidence=0.9",
         f"--output_dir={out}"])
  written = sorted(os.path.basename(p) for p in score.run())
  assert "vision_cka.png" in written
  data = json.load(open(os.path.join(out, "scores.json")))
  unc_json = data["uncertainty"]
  assert unc_json["options"]["bootstrap"] == 40 and unc_json["options"]["confidence"] == 0.9
  for c in data["candidates"]:
    for m in ("cka", "rsa"):
      entry = unc_json["candidates"][c][m]
      assert set(entry) >= {"ci_low", "ci_high", "p_value", "p_top1", "calibrated"}
      assert entry["ci_low"] <= entry["ci_high"]
  assert unc_json["candidates"]["isometric"]["rsa"]["p_value"] == pytest.approx(1 / 40)
  assert unc_json["metrics"]["cka"]["bootstrap_replicates"] == 40
  for m in ("cka", "rsa"):
    assert sum(unc_json["candidates"][c][m]["p_top1"] for c in data["candidates"]) == \
        pytest.approx(1.0)
    for corr in unc.CORRELATIONS:
      ev = data["evaluation"][m]
      assert ev[f"{corr}_ci_low"] <= ev[corr] + 1e-9 or corr == "pearson"
      assert 0 < ev[f"{corr}_p_value"] <= 1
  md = open(os.path.join(out, "report.md")).read()
  assert "### What each score resolves" in md and "- **cka** resolves " in md
  assert "![Each score against the ground truth](scores.png)" in md
  assert "![Linear CKA of the candidates with one another](vision_cka.png)" in md
  assert open(os.path.join(out, "vision_cka.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_gw_interval_from_cheap_replicates_and_no_pairing_null(small_pool):
  """GW never reads the pairing: shuffling it leaves the value unchanged, so it has no p-value;
  its interval comes from GW_REPLICATE_OPTIONS replicates centred on the reported value."""
  from vlmsel_jax.scores import gw  # pylint: disable=g-import-not-at-top
  x, y = small_pool.candidates[0][:24], small_pool.text[:24]
  shuffled = np.random.default_rng(0).permutation(24)
  same = gw.gw_distances([x, x[shuffled]], y, options=unc.GW_REPLICATE_OPTIONS)
  assert same[0].value == pytest.approx(same[1].value, rel=1e-4)
  options = unc.UncertaintyOptions(bootstrap=20, permutations=9, gw_bootstrap=3)
  observed = {"a": 1.0, "b": 2.0}
  u = unc.score_uncertainty("gw", ["a", "b"], [x, small_pool.candidates[11][:24]], y, observed,
                            SETTINGS, options, higher_is_better=False)
  assert u.replicates.shape == (3, 2) and u.null.shape == (0, 2)
  assert np.isnan(u.p_value).all() and "entropic" in u.note
  assert (u.ci_low <= u.ci_high).all()
  # Centred on the reported values (1 and 2 here), whatever the cheap solver's own level: GW
  # values of these features are below 0.1.
  assert np.abs(u.replicates - np.array([1.0, 2.0])).max() < 0.1


def test_labels_never_overlap():
  plt = report._pyplot()
  fig, ax = plt.subplots(figsize=(4, 3))
  xs = np.array([0.50, 0.51, 0.52, 0.50, 0.90, 0.10, 0.505])
  ys = np.array([0.70, 0.70, 0.71, 0.69, 0.20, 0.30, 0.705])
  ax.scatter(xs, ys)
  ax.margins(0.3)
  fig.tight_layout()
  ax.set_xlim(ax.get_xlim())
  ax.set_ylim(ax.get_ylim())
  texts = report.place_labels(ax, xs, ys, [f"efficientnet-lite{i}@res=128" for i in range(7)])
  renderer = fig.canvas.get_renderer()
  boxes = [report.text_box(t, renderer) for t in texts]
  for i in range(len(boxes)):
    for j in range(i + 1, len(boxes)):
      assert not boxes[i].overlaps(boxes[j]), (i, j)
  plt.close(fig)


def test_judge_binary_reports_intervals(tmp_path):
  truth = tmp_path / "truth.csv"
  truth.write_text("candidate,task,accuracy,accuracy_std,seeds\n" + "".join(
      f"c{i},vqa,{t},{'0.02' if i < 2 else ''},{'0 1' if i < 2 else '0'}\n"
      for i, t in enumerate(TRUTH9)))
  scores = tmp_path / "s.csv"
  scores.write_text("candidate,task,score\n" + "".join(
      f"c{i},vqa,{s}\n" for i, s in enumerate(SCORES9)))
  FLAGS.unparse_flags()
  FLAGS(["select", "--method=judge", f"--ground_truth={truth}", f"--scores={scores}",
         "--bootstrap=200", "--permutations=99", f"--output_dir={tmp_path / 'out'}"])
  result = select.run_method()
  v = result["methods"]["s"]["per_task"]["vqa"]
  for corr in unc.CORRELATIONS:
    assert v[f"{corr}_ci_low"] <= v[f"{corr}_ci_high"]
    assert 0 < v[f"{corr}_p_value"] <= 1
  assert result["uncertainty"]["bootstrap"] == 200
  md = open(tmp_path / "out" / "judge.md").read()
  assert "| method | Pearson | Spearman | Kendall | weighted τ | top-1 regret |" in md


def test_ground_truth_seed_noise_is_the_standard_error_over_seeds(tmp_path):
  from vlmsel_jax.scoring import pipeline  # pylint: disable=g-import-not-at-top
  path = tmp_path / "truth.csv"
  path.write_text("candidate,accuracy,accuracy_std,seeds\na,0.7,0.02,0 1\nb,0.6,,0\n")
  sd = pipeline.read_ground_truth_sd(str(path), "accuracy")
  assert sd == pytest.approx({"a": 0.02 / np.sqrt(2), "b": 0.0})


def test_scores_json_writes_undefined_values_as_null():
  """NaN is not JSON: GW's missing p-value and undefined correlations are written as null."""
  payload = {"p": float("nan"), "v": [np.float32("inf"), 1.5, {"q": np.float64("nan")}], "n": 3}
  text = json.dumps(report._finite_or_null(payload), allow_nan=False)  # pylint: disable=protected-access
  assert json.loads(text) == {"p": None, "v": [None, 1.5, {"q": None}], "n": 3}
