"""Scores a pool of candidates against one text feature bank: the library behind ``score``.

``score_pool`` computes every requested metric for every candidate, ranks the candidates per
metric (GW ascending, similarities descending) and, given ground truth, judges each metric with
``vlmsel_jax.scoring.metrics``. It returns plain data; ``vlmsel_jax.scoring.report`` writes it out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm import auto as tqdm

from vlmsel_jax.scoring import metrics as rank_metrics
from vlmsel_jax.scoring import uncertainty as unc
from vlmsel_jax.scores import checks
from vlmsel_jax.scores import cka
from vlmsel_jax.scores import gw
from vlmsel_jax.scores import similarity


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
  """Settings of every metric (each a flag of the score binary)."""
  distance: str = "angular"
  scale: str = "median"
  gw_options: gw.SolverOptions = gw.AnnealedOptions()  # gw.options_from_flags builds it.
  gw_batch_size: int = 0  # Candidates per batched GW call; 0 = one call per device-count block.
  gw_batch_mode: str = "auto"  # vmap / map / auto (see gw.gw_distances).
  rbf_sigma: float = 0.5
  knn_k: int = 10
  cca_pca_variance: float = 0.99
  svcca_keep: float = 0.99
  minibatch_size: int = 256
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str
  description: str
  higher_is_better: bool
  fn: Callable[[np.ndarray, np.ndarray, ScoreSettings], float] | None = None


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("gw", "Gromov-Wasserstein distance (lower = closer)", False),
    Metric("cka", "linear CKA", True, lambda x, y, s: cka.linear_cka(x, y)),
    Metric("cka_debiased", "debiased linear CKA (U-statistic HSIC)", True,
           lambda x, y, s: cka.debiased_linear_cka(x, y)),
    Metric("cka_rbf", "RBF-kernel CKA", True, lambda x, y, s: cka.rbf_cka(x, y, s.rbf_sigma)),
    Metric("cka_minibatch", "minibatch unbiased linear CKA", True,
           lambda x, y, s: cka.minibatch_cka(x, y, min(s.minibatch_size, x.shape[0]), s.seed)),
    Metric("rsa", "RSA (Spearman of pairwise distances)", True,
           lambda x, y, s: similarity.rsa(x, y, s.distance)),
    Metric("cca", "mean canonical correlation after PCA", True,
           lambda x, y, s: similarity.cca(x, y, pca_variance=s.cca_pca_variance)),
    Metric("svcca", "SVCCA", True, lambda x, y, s: similarity.svcca(x, y, s.svcca_keep)),
    Metric("mutual_knn", "mutual k-NN alignment", True,
           lambda x, y, s: similarity.mutual_knn(x, y, s.knn_k)),
    # Not functions of the feature banks: computed elsewhere and passed in as ``precomputed``.
    Metric("c_score", "C score: keypoint-correspondence PCK@0.10 of patch features", True),
    Metric("a_score", "A score: held-out caption log-likelihood after stage-1 training "
           "(needs training)", True),
)}
PRECOMPUTED = ("c_score", "a_score")
DEFAULT_METRICS = ("gw", "cka", "cka_debiased", "cka_rbf", "rsa", "cca", "svcca", "mutual_knn")


def parse_metrics(names: Sequence[str]) -> list[str]:
  names = [n.strip() for n in names if n.strip()]
  if not names:
    raise ValueError("no metrics requested; choose from " + ", ".join(METRICS))
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
  return list(dict.fromkeys(names))


@dataclasses.dataclass
class PoolScores:
  """Everything ``score_pool`` computes, as plain Python data."""
  candidates: list[str]
  metrics: list[str]
  values: dict[str, dict[str, float]]            # metric → candidate → value
  rankings: dict[str, list[str]]                 # metric → candidates, predicted best first
  diagnostics: dict[str, gw.GWResult]            # candidate → its GW result (diagnostics)
  # metric → candidate → competition rank (1 = predicted best; tied values share a rank), and
  # metric → every candidate tied at the best value: a score that cannot tell candidates apart
  # selects all of them, never whichever happened to be listed first.
  ranks: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  selected: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  evaluation: dict[str, dict[str, float]] | None = None  # metric → judgement vs ground truth
  ground_truth: dict[str, float] | None = None
  # candidate → standard error of its ground truth over seeds (0 where trained once).
  ground_truth_sd: dict[str, float] | None = None
  # Resampling results (``add_uncertainty``): options, and per metric its MetricUncertainty and
  # RankingStability; None when uncertainty was not asked for.
  uncertainty_options: unc.UncertaintyOptions | None = None
  uncertainty: dict[str, unc.MetricUncertainty] = dataclasses.field(default_factory=dict)
  stability: dict[str, unc.RankingStability] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Ranks and selections follow from the values; computed here so that every PoolScores has
    # them, however it was built.
    for m in self.metrics:
      if m in self.ranks and m in self.selected:
        continue
      oriented = rank_metrics.orient([self.values[m][n] for n in self.candidates],
                                     METRICS[m].higher_is_better)
      if np.isnan(oriented).any():  # No order among NaNs: the ranking's order stands.
        self.ranks[m] = {n: i + 1 for i, n in enumerate(self.rankings[m])}
        self.selected[m] = self.rankings[m][:1]
      else:
        self.ranks[m] = dict(zip(self.candidates,
                                 (int(r) for r in rank_metrics.competition_ranks(oriented))))
        self.selected[m] = [self.candidates[i] for i in rank_metrics.top_group(oriented)]

  def to_json(self) -> dict[str, Any]:
    return {
        "candidates": self.candidates,
        "metrics": {m: {"higher_is_better": METRICS[m].higher_is_better,
                        "description": METRICS[m].description} for m in self.metrics},
        "scores": {c: {m: self.values[m][c] for m in self.metrics} for c in self.candidates},
        "rankings": self.rankings,
        "ranks": self.ranks,
        "selected": self.selected,
        "gw_diagnostics": {c: {"converged": r.converged, "iterations": r.iterations,
                               "solver": r.solver} for c, r in self.diagnostics.items()},
        "ground_truth": self.ground_truth,
        "evaluation": self.evaluation,
        **({"uncertainty": self.uncertainty_json()} if self.uncertainty_options else {}),
    }

  def unresolved(self, m: str) -> list[list[str]]:
    """The candidates in predicted order, grouped where metric ``m`` cannot tell them apart."""
    return unc.unresolved_groups(self.candidates, [self.values[m][c] for c in self.candidates],
                                 self.stability[m].resolved, METRICS[m].higher_is_better)

  def uncertainty_json(self) -> dict[str, Any]:
    """Every interval: per candidate and metric, and per metric its resolved pairs."""
    def num(v) -> float:
      return float(v)
    per_candidate: dict[str, dict[str, dict[str, float]]] = {c: {} for c in self.candidates}
    per_metric = {}
    for m, u in self.uncertainty.items():
      st = self.stability.get(m)
      for i, c in enumerate(self.candidates):
        per_candidate[c][m] = {
            "value": self.values[m][c], "ci_low": num(u.ci_low[i]), "ci_high": num(u.ci_high[i]),
            "p_value": num(u.p_value[i]), "calibrated": num(u.calibrated[i]),
            "p_top1": num(st.p_top1[i]) if st is not None else float("nan")}
      resolved = ([] if st is None else
                  [[a, b] for i, a in enumerate(self.candidates)
                   for j, b in enumerate(self.candidates) if i < j and st.resolved[i, j]])
      per_metric[m] = {"bootstrap_replicates": int(u.replicates.shape[0]),
                       "permutations": int(u.null.shape[0]), "note": u.note,
                       "resolved_pairs": resolved,
                       "unresolved_groups": self.unresolved(m) if st is not None else []}
    return {"options": dataclasses.asdict(self.uncertainty_options),
            "candidates": per_candidate, "metrics": per_metric}


def _gw_values(names, feats, text, settings: ScoreSettings, progress) -> tuple[dict, dict]:
  import jax  # pylint: disable=g-import-not-at-top
  block = settings.gw_batch_size or jax.device_count()
  values, diags = {}, {}
  for start in range(0, len(feats), block):
    chunk = slice(start, start + block)
    results = gw.gw_distances(feats[chunk], text, options=settings.gw_options,
                              distance=settings.distance, scale=settings.scale,
                              names=names[chunk], batch_mode=settings.gw_batch_mode)
    for name, res in zip(names[chunk], results):
      values[name] = res.value
      diags[name] = res
    progress.update(len(results))
  return values, diags


def score_pool(names: Sequence[str], candidates: Sequence[np.ndarray], text: np.ndarray,
               metric_names: Sequence[str] = DEFAULT_METRICS,
               settings: ScoreSettings = ScoreSettings(),
               ground_truth: Mapping[str, float] | None = None,
               show_progress: bool = True,
               precomputed: Mapping[str, Mapping[str, float]] | None = None,
               uncertainty: unc.UncertaintyOptions | None = None,
               ground_truth_sd: Mapping[str, float] | None = None) -> PoolScores:
  """Scores each candidate's features against ``text`` (rows paired) with every metric.

  With ``uncertainty`` (options that are ``enabled``), every score of the paired samples gets a
  bootstrap interval, a permutation p-value and its ranking stability, and every judgement its
  intervals and p-values (``add_uncertainty``); ``ground_truth_sd`` (candidate → standard error
  of its ground truth over seeds) lets the judgement resample the ground truth within it.

  ``precomputed`` maps a metric of ``PRECOMPUTED`` (e.g. the C score, measured on keypoint pairs
  rather than the banks) to its value per candidate; those metrics are ranked and judged like
  the others and appended to ``metric_names``. All inputs are validated before any work: a bad
  candidate fails fast with its name.
  """
  names = list(names)
  if not names:
    raise ValueError("the candidate list is empty")
  if len(set(names)) != len(names):
    raise ValueError(f"candidate names must be unique, got {names}")
  if len(names) != len(candidates):
    raise ValueError(f"{len(names)} candidate names but {len(candidates)} feature matrices")
  precomputed = dict(precomputed or {})
  metric_names = parse_metrics(list(metric_names) + [m for m in precomputed
                                                     if m not in metric_names])
  for m in metric_names:
    if m in PRECOMPUTED and m not in precomputed:
      raise ValueError(f"metric {m} is not computed from feature banks; pass its values")
  for m, by_name in precomputed.items():
    if m not in PRECOMPUTED:
      raise ValueError(f"metric {m} is computed here; only {', '.join(PRECOMPUTED)} are passed in")
    missing = [n for n in names if n not in by_name]
    if missing:
      raise ValueError(f"{m}: no value for candidate(s) {', '.join(missing)}")
    bad = [n for n in names if not np.isfinite(by_name[n])]
    if bad:
      raise ValueError(f"{m}: non-finite value for candidate(s) {', '.join(bad)}")
  text = checks.check_features(text, "text features")
  feats = [checks.check_pair(x, text, n, "text features")[0] for n, x in zip(names, candidates)]
  if ground_truth is not None:
    missing = [n for n in names if n not in ground_truth]
    if missing:
      raise ValueError(f"ground truth has no accuracy for candidate(s) {', '.join(missing)}")

  values: dict[str, dict[str, float]] = {}
  diagnostics: dict[str, gw.GWResult] = {}
  total = len(names) * len(metric_names)
  with tqdm.tqdm(total=total, desc="scoring", unit="score", disable=not show_progress) as bar:
    for m in metric_names:
      bar.set_postfix_str(m)
      if m == "gw":
        values[m], diagnostics = _gw_values(names, feats, text, settings, bar)
        continue
      if m in precomputed:
        values[m] = {n: float(precomputed[m][n]) for n in names}
        bar.update(len(names))
        continue
      values[m] = {}
      for name, x in zip(names, feats):
        values[m][name] = float(METRICS[m].fn(x, text, settings))
        bar.update(1)

  rankings = {}
  for m in metric_names:
    oriented = rank_metrics.orient([values[m][n] for n in names], METRICS[m].higher_is_better)
    order = np.argsort(-oriented, kind="stable")
    rankings[m] = [names[i] for i in order]

  evaluation = None
  if ground_truth is not None:
    truth = np.array([ground_truth[n] for n in names], np.float64)
    # NDCG needs non-negative gains; every other metric is invariant to shifting the truth, so a
    # truth with negative values (e.g. log-likelihoods) is shifted to start at zero.
    if truth.min() < 0:
      truth = truth - truth.min()
    evaluation = {}
    for m in metric_names:
      predicted = rank_metrics.orient([values[m][n] for n in names], METRICS[m].higher_is_better)
      evaluation[m] = rank_metrics.all_metrics(truth, predicted)
  result = PoolScores(candidates=names, metrics=metric_names, values=values, rankings=rankings,
                      diagnostics=diagnostics, evaluation=evaluation,
                      ground_truth=None if ground_truth is None else
                      {n: float(ground_truth[n]) for n in names},
                      ground_truth_sd=None if ground_truth is None else
                      {n: float((ground_truth_sd or {}).get(n, 0.0)) for n in names})
  if uncertainty is not None and uncertainty.enabled:
    add_uncertainty(result, feats, text, settings, uncertainty, show_progress)
  return result


def add_uncertainty(result: PoolScores, feats: Sequence[np.ndarray], text: np.ndarray,
                    settings: ScoreSettings, options: unc.UncertaintyOptions,
                    show_progress: bool = False) -> None:
  """Fills ``result``'s intervals, p-values, ranking stability and judgement intervals.

  The bootstrap and permutation draws are shared by every candidate and metric
  (``uncertainty`` module docstring); precomputed scores get none.
  """
  result.uncertainty_options = options
  sides: dict = {}
  resampled = [m for m in result.metrics if m in unc.RESAMPLED]
  with tqdm.tqdm(total=len(resampled), desc="uncertainty", unit="metric",
                 disable=not show_progress) as bar:
    for m in resampled:
      bar.set_postfix_str(m)
      u = unc.score_uncertainty(m, result.candidates, feats, text, result.values[m], settings,
                                options, sides, higher_is_better=METRICS[m].higher_is_better)
      result.uncertainty[m] = u
      if u.replicates.shape[0]:
        result.stability[m] = unc.ranking_stability(u.replicates, METRICS[m].higher_is_better,
                                                    options.confidence)
      bar.update(1)
  if result.evaluation is None:
    return
  truth = np.array([result.ground_truth[c] for c in result.candidates])
  sd = np.array([result.ground_truth_sd[c] for c in result.candidates])
  for m in result.metrics:
    u = result.uncertainty.get(m)
    reps = u.replicates if u is not None and u.replicates.shape[0] else None
    result.evaluation[m].update(unc.judgement_uncertainty(
        [result.values[m][c] for c in result.candidates], truth,
        higher_is_better=METRICS[m].higher_is_better, options=options, truth_sd=sd,
        score_replicates=reps))
