"""Mordal: find the best (vision encoder, LLM) pair while training only a few of them.

The search (METHODS.md §3), as a pure function of its inputs and one callable:

1. **Two-step clustering.** Vision encoders are clustered by agglomerative clustering on the
   distance 1 − CKA (threshold ``vision_threshold``); each cluster's medoid is the member with
   the smallest summed distance to the others. Then, for each vision cluster, the LLMs are
   clustered the same way (``llm_threshold``) on the CKA between LLM representations of the
   medoid encoder's images pushed through a warm-up projector (so the LLM similarity may
   differ per vision medoid; one matrix for all medoids is allowed). A *cluster* is a
   (vision cluster, LLM cluster) pair; its medoid candidate is (vision medoid, LLM medoid).
2. **Inter-cluster successive halving** on the cluster medoids: every surviving medoid is
   trained to data fraction b (``initial_budget``), the best ⌈n/η⌉ (never fewer than
   ``top_clusters``) stay, b ×= η, for at most ``rounds`` rounds; the best ``top_clusters``
   clusters go on.
3. **Intra-cluster scaling-law extrapolation.** Every member of those clusters is trained on
   the growing fractions ``fractions`` (1/16, 1/8, … 1). Once a member has ``min_points`` points,
   log(error) = a + b·log(r) is fitted by least squares (error = ``max_accuracy`` − accuracy) and
   extrapolated to r = 1; a member whose extrapolation is below the leader's estimate (minus
   ``early_stop_margin``) is stopped. When the leader's measured full-data accuracy comes in
   below a stopped member's extrapolation, that member resumes from its checkpoint.

The ranking puts the members of the kept clusters first (by their full-data accuracy when
trained to r = 1, else their extrapolation), then the other clusters in the order successive
halving eliminated them (later = better), each cluster's medoid first and its other members by
their distance to the medoid.

**Cost accounting with checkpoint reuse.** ``train(candidate, r)`` returns (accuracy at data
fraction r, cumulative cost of training the candidate from scratch to r). Training resumes from
the candidate's last checkpoint and is never restarted, so taking a candidate from fraction r1 to
r2 > r1 costs cost(r2) − cost(r1), never cost(r2) again; a fraction already reached is free.
A candidate's total is therefore the cost of the largest fraction it reached, and the search's
cost is the sum of those. Grid search trains every candidate to r = 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial import distance as scipy_distance

from vlmsel_jax.scoring import metrics as rank_metrics

LINKAGES = ("average", "complete", "single")
TrainFn = Callable[[str, float], tuple[float, float]]


class MordalError(ValueError):
  """Inconsistent inputs or settings; the message is one line."""


@dataclasses.dataclass(frozen=True)
class MordalConfig:
  """Settings of the search (each a flag of ``--method=mordal``)."""
  vision_threshold: float = 0.7
  llm_threshold: float = 0.8
  linkage: str = "average"
  eta: int = 2
  initial_budget: float = 1 / 16
  rounds: int = 3
  top_clusters: int = 2
  fractions: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
  min_points: int = 3
  early_stop_margin: float = 0.0
  max_accuracy: float = 1.0

  def validate(self):
    if self.linkage not in LINKAGES:
      raise MordalError(f"linkage {self.linkage!r} is not one of {', '.join(LINKAGES)}")
    for name in ("vision_threshold", "llm_threshold"):
      if not 0.0 <= getattr(self, name) <= 2.0:
        raise MordalError(f"{name} must be a 1 − CKA distance in [0, 2], got {getattr(self, name)}")
    if self.eta < 2:
      raise MordalError(f"eta must be at least 2, got {self.eta}")
    if not 0.0 < self.initial_budget <= 1.0:
      raise MordalError(f"initial_budget must be a data fraction in (0, 1], got "
                        f"{self.initial_budget}")
    if self.rounds < 1 or self.top_clusters < 1:
      raise MordalError("rounds and top_clusters must be at least 1")
    fr = list(self.fractions)
    if not fr or fr != sorted(set(fr)) or fr[0] <= 0.0 or not math.isclose(fr[-1], 1.0):
      raise MordalError(f"fractions must increase strictly from above 0 to 1.0, got {fr}")
    if not self.early_stop_margin >= 0.0:
      raise MordalError(f"early_stop_margin must be >= 0, got {self.early_stop_margin}")
    if self.min_points < 2:
      raise MordalError(f"min_points must be at least 2 (a line needs two), got {self.min_points}")


# ----------------------------------------------------------------------------------------------
# Clustering.


def check_similarity(names: Sequence[str], matrix: np.ndarray, what: str) -> np.ndarray:
  """``matrix`` as a float64 square symmetric CKA matrix over ``names``, or a MordalError."""
  m = np.asarray(matrix, np.float64)
  n = len(names)
  if m.shape != (n, n):
    raise MordalError(f"{what}: expected a {n}×{n} matrix, got shape {m.shape}")
  if not np.all(np.isfinite(m)):
    i, j = np.argwhere(~np.isfinite(m))[0]
    raise MordalError(f"{what}: non-finite similarity at ({names[i]}, {names[j]})")
  if not np.allclose(m, m.T, atol=1e-6):
    i, j = np.unravel_index(np.argmax(np.abs(m - m.T)), m.shape)
    raise MordalError(f"{what}: not symmetric at ({names[i]}, {names[j]}): {m[i, j]:g} vs "
                      f"{m[j, i]:g}")
  return (m + m.T) / 2.0


def agglomerative(names: Sequence[str], distance: np.ndarray, threshold: float,
                  linkage: str = "average") -> list[list[str]]:
  """Agglomerative clusters of ``names`` under a precomputed distance matrix.

  Clusters merge (closest pair first, ``linkage`` distance between clusters) as long as their
  linkage distance is ≤ ``threshold`` (scipy ``fcluster(criterion="distance")``). Clusters are
  returned in the order of their first member in ``names``, members in ``names`` order.
  """
  n = len(names)
  if n == 1:
    return [list(names)]
  d = np.array(distance, np.float64)
  np.fill_diagonal(d, 0.0)
  tree = hierarchy.linkage(scipy_distance.squareform(np.maximum(d, 0.0), checks=False),
                           method=linkage)
  labels = hierarchy.fcluster(tree, t=threshold, criterion="distance")
  clusters: dict[int, list[str]] = {}
  for name, label in zip(names, labels):
    clusters.setdefault(int(label), []).append(name)
  return list(clusters.values())


def medoid(members: Sequence[str], names: Sequence[str], distance: np.ndarray) -> str:
  """The member with the smallest summed distance to the other members (first on ties)."""
  idx = [list(names).index(m) for m in members]
  sub = distance[np.ix_(idx, idx)]
  return members[int(np.argmin(sub.sum(axis=1)))]


@dataclasses.dataclass
class Cluster:
  """A (vision cluster, LLM cluster) pair and its candidates."""
  id: str
  vision: list[str]
  llm: list[str]
  vision_medoid: str
  llm_medoid: str
  medoid: str                 # The medoid candidate.
  members: list[str]          # Candidates, medoid first, then by distance to it.


def two_step_clustering(
    candidates: Mapping[tuple[str, str], str], vision_names: Sequence[str],
    vision_similarity: np.ndarray,
    llm_similarity: Mapping[str, tuple[Sequence[str], np.ndarray]], config: MordalConfig
) -> list[Cluster]:
  """Step 1 of Mordal: vision clusters on 1 − CKA, then LLM clusters per vision medoid.

  Args:
    candidates: (vision, llm) → candidate name.
    vision_names: rows/columns of ``vision_similarity``.
    vision_similarity: CKA between vision encoders.
    llm_similarity: vision medoid → (LLM names, CKA between the LLMs' representations through
      that medoid's warm-up projector). The key "*" stands for every medoid.
    config: thresholds and linkage.
  """
  vision_used = [v for v in vision_names if any(k[0] == v for k in candidates)]
  vidx = [list(vision_names).index(v) for v in vision_used]
  vdist = 1.0 - np.asarray(vision_similarity)[np.ix_(vidx, vidx)]
  clusters = []
  for vi, vcluster in enumerate(agglomerative(vision_used, vdist, config.vision_threshold,
                                              config.linkage)):
    vmed = medoid(vcluster, vision_used, vdist)
    if vmed in llm_similarity:
      llm_names, lsim = llm_similarity[vmed]
    elif "*" in llm_similarity:
      llm_names, lsim = llm_similarity["*"]
    else:
      raise MordalError(f"no LLM similarity matrix for vision medoid {vmed!r} (have: "
                        f"{', '.join(llm_similarity)})")
    llm_used = [l for l in llm_names if any(k[0] in vcluster and k[1] == l for k in candidates)]
    lidx = [list(llm_names).index(l) for l in llm_used]
    ldist = 1.0 - np.asarray(lsim)[np.ix_(lidx, lidx)]
    for li, lcluster in enumerate(agglomerative(llm_used, ldist, config.llm_threshold,
                                                config.linkage)):
      lmed = medoid(lcluster, llm_used, ldist)
      if (vmed, lmed) not in candidates:
        raise MordalError(f"the medoid pair ({vmed}, {lmed}) of a cluster is not a candidate")
      members = [(v, l) for v in vcluster for l in lcluster if (v, l) in candidates]
      vpos, lpos = vision_used.index(vmed), llm_used.index(lmed)

      def to_medoid(pair, vpos=vpos, lpos=lpos):
        return (vdist[vision_used.index(pair[0]), vpos] + ldist[llm_used.index(pair[1]), lpos])

      members.sort(key=lambda p: (to_medoid(p), candidates[p]))
      clusters.append(Cluster(id=f"V{vi}L{li}", vision=list(vcluster), llm=list(lcluster),
                              vision_medoid=vmed, llm_medoid=lmed,
                              medoid=candidates[(vmed, lmed)],
                              members=[candidates[p] for p in members]))
  return clusters


# ----------------------------------------------------------------------------------------------
# Training ledger.


class Ledger:
  """Calls ``train`` and accounts for its cost with checkpoint reuse (module docstring)."""

  def __init__(self, train: TrainFn):
    self._train = train
    self.points: dict[str, dict[float, float]] = {}      # candidate → fraction → accuracy
    self.cumulative: dict[str, float] = {}                # candidate → cost(max fraction)
    self.total = 0.0
    self.log: list[dict[str, Any]] = []

  def reached(self, candidate: str) -> float:
    """The largest fraction ``candidate`` was trained to (0 if never)."""
    return max(self.points.get(candidate, {}), default=0.0)

  def train(self, candidate: str, fraction: float, phase: str) -> float:
    """Accuracy of ``candidate`` at ``fraction``; pays cost(fraction) − cost(reached)."""
    known = self.points.get(candidate, {})
    for r, acc in known.items():
      if math.isclose(r, fraction, rel_tol=1e-9):
        return acc
    if fraction < self.reached(candidate):
      raise MordalError(f"{candidate}: asked for fraction {fraction:g} after training to "
                        f"{self.reached(candidate):g}; checkpoints only go forward")
    accuracy, cost = self._train(candidate, fraction)
    accuracy, cost = float(accuracy), float(cost)
    if not (math.isfinite(accuracy) and math.isfinite(cost)):
      raise MordalError(f"{candidate} at fraction {fraction:g}: non-finite accuracy {accuracy} "
                        f"or cost {cost}")
    paid = cost - self.cumulative.get(candidate, 0.0)
    if paid < 0.0:
      raise MordalError(f"{candidate}: cost to fraction {fraction:g} ({cost:g}) is below the "
                        f"cost already paid to reach {self.reached(candidate):g} "
                        f"({self.cumulative[candidate]:g}); costs must be cumulative")
    self.points.setdefault(candidate, {})[fraction] = accuracy
    self.cumulative[candidate] = cost
    self.total += paid
    self.log.append({"phase": phase, "candidate": candidate, "fraction": fraction,
                     "accuracy": accuracy, "paid": paid})
    return accuracy


# ----------------------------------------------------------------------------------------------
# Search phases.


def successive_halving(clusters: Sequence[Cluster], ledger: Ledger, config: MordalConfig
                       ) -> tuple[list[str], list[dict[str, Any]]]:
  """Inter-cluster successive halving on the medoids.

  Returns:
    (cluster ids best first: the survivors of the last round by their last accuracy, then the
    clusters eliminated in earlier rounds, later rounds first, each round by accuracy),
    one record per round.
  """
  survivors = [c.id for c in clusters]
  by_id = {c.id: c for c in clusters}
  budget = config.initial_budget
  eliminated: list[list[str]] = []
  rounds = []
  for rnd in range(config.rounds):
    acc = {cid: ledger.train(by_id[cid].medoid, budget, f"halving round {rnd + 1}")
           for cid in survivors}
    ranked = sorted(survivors, key=lambda cid: -acc[cid])  # Stable: ties keep cluster order.
    last = rnd == config.rounds - 1 or len(survivors) <= config.top_clusters or budget >= 1.0
    keep = len(ranked) if last else max(min(config.top_clusters, len(ranked)),
                                        math.ceil(len(ranked) / config.eta))
    rounds.append({"round": rnd + 1, "fraction": budget, "accuracy": acc,
                   "kept": ranked[:keep]})
    eliminated.append(ranked[keep:])
    survivors = ranked[:keep]
    if last:
      break
    budget = min(1.0, budget * config.eta)
  order = list(survivors)
  for out in reversed(eliminated):
    order += out
  return order, rounds


def fit_scaling_law(fractions: Sequence[float], accuracies: Sequence[float],
                    max_accuracy: float = 1.0, floor: float = 1e-6) -> tuple[float, float]:
  """Least-squares (a, b) of log(max_accuracy − accuracy) = a + b·log(r); error floored at ``floor``."""
  r = np.asarray(fractions, np.float64)
  err = np.maximum(max_accuracy - np.asarray(accuracies, np.float64), floor)
  design = np.stack([np.ones_like(r), np.log(r)], axis=1)
  (a, b), *_ = np.linalg.lstsq(design, np.log(err), rcond=None)
  return float(a), float(b)


def extrapolate(fractions: Sequence[float], accuracies: Sequence[float], to: float = 1.0,
                max_accuracy: float = 1.0) -> float:
  """The accuracy the fitted power law predicts at data fraction ``to``."""
  a, b = fit_scaling_law(fractions, accuracies, max_accuracy)
  return max_accuracy - math.exp(a + b * math.log(to))


def intra_cluster(members: Sequence[str], ledger: Ledger, config: MordalConfig
                  ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
  """Scaling-law evaluation of ``members`` with early stopping.

  A member is stopped once its extrapolation is below the leader's estimate (less the margin).
  The leader's estimate is itself an extrapolation until the leader reaches r = 1, and its
  measured full-data accuracy may come in lower; a stopped member whose extrapolation is not
  below the best measured full-data accuracy (less the margin) was stopped by a promise the
  leader did not keep, so it is resumed from its checkpoint and goes on through the fractions
  under the same rule. Every member either reaches r = 1 or is stopped below a measured full
  run, so the best estimate is always a measured one.

  Returns:
    (candidate → estimate of its full-data accuracy, candidate → {"status", "reached",
    "extrapolated", "resumed"}). The estimate is the measured accuracy at r = 1 when reached,
    else the extrapolation (with ≥ ``min_points`` points), else the last measured accuracy.
  """
  active = list(members)
  stopped: set[str] = set()
  resumed: dict[str, int] = {}
  estimate: dict[str, float] = {}
  extrapolated: dict[str, float] = {}

  def finished(m: str) -> bool:
    return math.isclose(ledger.reached(m), 1.0)

  while True:
    for r in config.fractions:
      trained_now = False
      for m in active:
        if ledger.reached(m) < r and not math.isclose(ledger.reached(m), r):
          ledger.train(m, r, "intra-cluster")
          trained_now = True
      if not trained_now and estimate:
        continue  # A resumed member's earlier fractions: nothing new to judge.
      for m in active:
        pts = sorted(ledger.points[m].items())
        if finished(m):
          estimate[m] = pts[-1][1]
        elif len(pts) >= config.min_points:
          extrapolated[m] = extrapolate([p[0] for p in pts], [p[1] for p in pts],
                                        max_accuracy=config.max_accuracy)
          estimate[m] = extrapolated[m]
        else:
          estimate[m] = pts[-1][1]
      fitted = [m for m in active if m in extrapolated or finished(m)]
      if fitted:
        leader = max(estimate[m] for m in fitted)
        for m in list(active):
          if (m in extrapolated and not finished(m)
              and estimate[m] < leader - config.early_stop_margin):
            active.remove(m)
            stopped.add(m)
    best = max((estimate[m] for m in members if finished(m)), default=-math.inf)
    revive = [m for m in members if m in stopped
              and not estimate[m] < best - config.early_stop_margin]
    if not revive:
      break
    for m in revive:
      stopped.discard(m)
      resumed[m] = resumed.get(m, 0) + 1
    active = [m for m in members if finished(m) or m in revive]
  status = {}
  for m in members:
    status[m] = {"status": (f"stopped early at fraction {ledger.reached(m):g}" if m in stopped
                            else "trained to 1.0"),
                 "reached": ledger.reached(m), "extrapolated": extrapolated.get(m),
                 "resumed": resumed.get(m, 0)}
  return estimate, status


@dataclasses.dataclass
class MordalResult:
  """What the search found and what it paid."""
  ranking: list[str]
  top1: str
  cost: float
  clusters: list[Cluster]
  halving_order: list[str]
  halving_rounds: list[dict[str, Any]]
  kept_clusters: list[str]
  estimates: dict[str, float]
  intra_status: dict[str, dict[str, Any]]
  trained: dict[str, dict[float, float]]
  log: list[dict[str, Any]]


def result_fields(result: MordalResult, config: MordalConfig, grid_cost: float
                  ) -> dict[str, Any]:
  """The JSON fields every mode's output shares: what was found, paid and trained, and how."""
  return {
      "ranking": result.ranking,
      "top1": result.top1,
      "cost": result.cost,
      "grid_cost": grid_cost,
      "cost_ratio": grid_cost / result.cost if result.cost > 0 else float("inf"),
      "trained_candidates": len(result.trained),
      "clusters": [vars(c) for c in result.clusters],
      "halving_order": result.halving_order,
      "halving_rounds": result.halving_rounds,
      "kept_clusters": result.kept_clusters,
      "estimates": result.estimates,
      "intra_status": result.intra_status,
      "trained": {c: {repr(r): a for r, a in sorted(p.items())} for c, p in result.trained.items()},
      "log": result.log,
      "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
  }


def search(candidates: Mapping[tuple[str, str], str], vision_names: Sequence[str],
           vision_similarity: np.ndarray,
           llm_similarity: Mapping[str, tuple[Sequence[str], np.ndarray]],
           train: TrainFn, config: MordalConfig = MordalConfig()) -> MordalResult:
  """The whole Mordal search; ``train(candidate, fraction) -> (accuracy, cumulative cost)``.

  Args:
    candidates: (vision, llm) → candidate name, every pair that may be built.
    vision_names: names of ``vision_similarity``'s rows and columns.
    vision_similarity: CKA between the vision encoders.
    llm_similarity: vision medoid (or "*" for all) → (LLM names, CKA matrix between the LLMs).
    train: trains (resuming) a candidate to a data fraction; see the module docstring.
    config: the search's settings.
  """
  config.validate()
  if not candidates:
    raise MordalError("no candidates")
  names = list(candidates.values())
  if len(set(names)) != len(names):
    raise MordalError("candidate names are not unique")
  vision_similarity = check_similarity(vision_names, vision_similarity, "vision similarity")
  missing = sorted({v for v, _ in candidates} - set(vision_names))
  if missing:
    raise MordalError(f"vision similarity has no row for encoder(s) {', '.join(missing)}")
  checked = {}
  for key, (llm_names, sim) in llm_similarity.items():
    checked[key] = (list(llm_names), check_similarity(llm_names, sim, f"LLM similarity [{key}]"))
    absent = sorted({l for _, l in candidates} - set(llm_names))
    if absent:
      raise MordalError(f"LLM similarity [{key}] has no row for LLM(s) {', '.join(absent)}")

  clusters = two_step_clustering(candidates, vision_names, vision_similarity, checked, config)
  ledger = Ledger(train)
  order, rounds = successive_halving(clusters, ledger, config)
  kept = order[:config.top_clusters]
  by_id = {c.id: c for c in clusters}
  members = [m for cid in kept for m in by_id[cid].members]
  estimates, status = intra_cluster(members, ledger, config)
  ranking = sorted(members, key=lambda m: (-estimates[m], m))
  for cid in order[config.top_clusters:]:
    ranking += by_id[cid].members
  return MordalResult(ranking=ranking, top1=ranking[0], cost=ledger.total, clusters=clusters,
                      halving_order=order, halving_rounds=rounds, kept_clusters=kept,
                      estimates=estimates, intra_status=status,
                      trained={c: dict(p) for c, p in ledger.points.items()}, log=ledger.log)


def ranking_weighted_tau(ranking: Sequence[str], truth: Mapping[str, float]) -> float:
  """Weighted Kendall τ (scipy's weightedtau convention) of a ranking against true accuracies."""
  position = {c: i for i, c in enumerate(ranking)}
  names = sorted(truth)
  return rank_metrics.weighted_kendall_tau([-position[c] for c in names],
                                           [truth[c] for c in names])
