"""Mordal: clustering, successive halving, scaling laws, cost accounting, the replay binary."""

import csv
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest
import scipy.stats
from absl import flags
from sklearn.cluster import AgglomerativeClustering

from vlmsel_jax.scoring import report
from vlmsel_jax import select
from vlmsel_jax.selection import mordal
from vlmsel_jax.selection import mordal_replay
from vlmsel_jax.selection import tables

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table_train(table, calls=None):
  """train() over {candidate: {fraction: (accuracy, cumulative cost)}}, recording calls."""

  def train(candidate, fraction):
    if calls is not None:
      calls.append((candidate, fraction))
    return table[candidate][fraction]

  return train


def _singletons(names):
  """A similarity with every off-diagonal CKA 0: each name is its own cluster at t < 1."""
  return np.eye(len(names))


def test_successive_halving_hand_computed():
  # 4 encoders × 1 LLM, every encoder its own cluster. Cumulative cost = 10 × fraction.
  acc = {"A": {0.25: 0.40, 0.5: 0.45, 1.0: 0.50}, "B": {0.25: 0.30, 0.5: 0.50, 1.0: 0.60},
         "C": {0.25: 0.20, 0.5: 0.55, 1.0: 0.70}, "D": {0.25: 0.10, 0.5: 0.20, 1.0: 0.30}}
  table = {c: {r: (a, 10 * r) for r, a in per.items()} for c, per in acc.items()}
  calls = []
  cands = {(v, "llm"): v for v in "ABCD"}
  config = mordal.MordalConfig(vision_threshold=0.5, eta=2, initial_budget=0.25, rounds=2,
                               top_clusters=1, fractions=(0.25, 0.5, 1.0))
  result = mordal.search(cands, list("ABCD"), _singletons("ABCD"),
                         {"*": (["llm"], np.eye(1))}, _table_train(table, calls), config)
  # Round 1 at 0.25: A 0.40 > B 0.30 > C 0.20 > D 0.10, keep ⌈4/2⌉ = 2: A, B.
  # Round 2 at 0.5: B 0.50 > A 0.45; the last round keeps top_clusters = 1: B.
  assert [r["kept"] for r in result.halving_rounds] == [["V0L0", "V1L0"], ["V1L0", "V0L0"]]
  assert result.halving_order == ["V1L0", "V0L0", "V2L0", "V3L0"]
  # C would have won at 1.0 but was eliminated at 0.25: successive halving's known blind spot.
  assert result.ranking == ["B", "A", "C", "D"] and result.top1 == "B"
  # Intra-cluster: B already reached 0.5 (0.25 and 0.5 are reused), so only 1.0 is trained.
  assert calls == [("A", 0.25), ("B", 0.25), ("C", 0.25), ("D", 0.25), ("A", 0.5), ("B", 0.5),
                   ("B", 1.0)]
  # Cost with checkpoint reuse: 4 × 2.5 + (5 − 2.5) × 2 + (10 − 5) = 20, never 10 again for B.
  assert result.cost == pytest.approx(20.0)
  assert result.estimates == {"B": 0.60}


def test_successive_halving_never_keeps_fewer_than_top_clusters():
  acc = {c: {0.25: a, 0.5: a, 1.0: a} for c, a in zip("ABCDE", (0.5, 0.4, 0.3, 0.2, 0.1))}
  table = {c: {r: (a, r) for r, a in per.items()} for c, per in acc.items()}
  config = mordal.MordalConfig(vision_threshold=0.5, eta=4, initial_budget=0.25, rounds=3,
                               top_clusters=3, fractions=(0.25, 0.5, 1.0))
  cands = {(v, "l"): v for v in "ABCDE"}
  result = mordal.search(cands, list("ABCDE"), _singletons("ABCDE"), {"*": (["l"], np.eye(1))},
                         _table_train(table), config)
  # ⌈5/4⌉ = 2 < top_clusters = 3, so 3 stay; with 3 ≤ top_clusters left, halving stops.
  assert [len(r["kept"]) for r in result.halving_rounds] == [3, 3]
  assert result.kept_clusters == ["V0L0", "V1L0", "V2L0"]


def test_scaling_law_fit_recovers_an_exact_power_law():
  r = np.array([1 / 16, 1 / 8, 1 / 4])
  acc = 1.0 - 0.3 * r ** -0.25
  a, b = mordal.fit_scaling_law(r, acc)
  assert a == pytest.approx(math.log(0.3), abs=1e-12) and b == pytest.approx(-0.25, abs=1e-12)
  assert mordal.extrapolate(r, acc) == pytest.approx(0.7, abs=1e-12)
  # Percent accuracies with max_accuracy=100 give the same law.
  assert mordal.extrapolate(r, 100 * acc, max_accuracy=100.0) == pytest.approx(70.0, abs=1e-9)


def test_scaling_law_fit_matches_polyfit_on_noisy_points():
  r = np.array([1 / 16, 1 / 8, 1 / 4, 1 / 2])
  acc = np.array([0.21, 0.37, 0.44, 0.52])
  b_ref, a_ref = np.polyfit(np.log(r), np.log(1.0 - acc), 1)
  a, b = mordal.fit_scaling_law(r, acc)
  assert (a, b) == pytest.approx((a_ref, b_ref), abs=1e-12)
  assert mordal.extrapolate(r, acc) == pytest.approx(1.0 - math.exp(a_ref), abs=1e-12)


def test_intra_cluster_early_stops_the_member_that_cannot_reach_the_leader():
  fractions = (1 / 8, 1 / 4, 1 / 2, 1.0)
  # Exact power laws: M1 ends at 0.7, M2 at 0.5, M3 at 0.69 (within a 0.02 margin of M1).
  law = {"M1": 0.3, "M2": 0.5, "M3": 0.31}
  table = {m: {r: (1.0 - e * r ** -0.2, r * 8) for r in fractions} for m, e in law.items()}
  ledger = mordal.Ledger(_table_train(table))
  config = mordal.MordalConfig(fractions=fractions, min_points=3, early_stop_margin=0.02)
  estimates, status = mordal.intra_cluster(["M1", "M2", "M3"], ledger, config)
  # After 1/2 every member has 3 points: leader M1 at 0.7; M2 (0.5) < 0.7 − 0.02 stops.
  assert status["M2"]["status"] == "stopped early at fraction 0.5"
  assert status["M1"]["status"] == status["M3"]["status"] == "trained to 1.0"
  assert estimates["M2"] == pytest.approx(0.5, abs=1e-12)
  assert estimates["M1"] == pytest.approx(0.7, abs=1e-12)
  # Cost: M1 and M3 to 1.0 (8 each), M2 to 1/2 (4).
  assert ledger.total == pytest.approx(20.0)


@pytest.mark.parametrize("m2_full", [0.64, 0.60])
def test_intra_cluster_resumes_a_member_stopped_by_a_leader_that_came_in_lower(m2_full):
  # M1: 0.50, 0.60 at 1/4, 1/2 -> errors 0.5, 0.4 -> extrapolation 1 - 0.4 * 0.8 = 0.68;
  #     its full run measures 0.62.
  # M2: 0.45, 0.55 -> errors 0.55, 0.45 -> 1 - 0.45 * (0.45 / 0.55) = 0.631818...
  # At 1/2 M2 (0.632) < leader M1 (0.68): stopped. M1's full run (0.62) is below 0.632, so M2
  # resumes from 1/2 and is measured at 1.0.
  table = {"M1": {0.25: (0.50, 2.0), 0.5: (0.60, 4.0), 1.0: (0.62, 8.0)},
           "M2": {0.25: (0.45, 2.0), 0.5: (0.55, 4.0), 1.0: (m2_full, 8.0)}}
  calls = []
  ledger = mordal.Ledger(_table_train(table, calls))
  config = mordal.MordalConfig(fractions=(0.25, 0.5, 1.0), min_points=2)
  estimates, status = mordal.intra_cluster(["M1", "M2"], ledger, config)
  assert status["M2"]["extrapolated"] == pytest.approx(1 - 0.45 * 0.45 / 0.55, abs=1e-12)
  assert calls == [("M1", 0.25), ("M2", 0.25), ("M1", 0.5), ("M2", 0.5), ("M1", 1.0),
                   ("M2", 1.0)]
  assert status["M2"] == {"status": "trained to 1.0", "reached": 1.0, "resumed": 1,
                          "extrapolated": status["M2"]["extrapolated"]}
  assert status["M1"]["resumed"] == 0
  assert estimates == pytest.approx({"M1": 0.62, "M2": m2_full}, abs=1e-12)
  assert ledger.total == pytest.approx(16.0)  # Resuming pays 1/2 -> 1 only (4), not 8 again.


def test_intra_cluster_keeps_stopped_a_member_below_the_measured_leader():
  # As above, but M1's full run (0.65) is above M2's extrapolation (0.632): M2 stays stopped.
  table = {"M1": {0.25: (0.50, 2.0), 0.5: (0.60, 4.0), 1.0: (0.65, 8.0)},
           "M2": {0.25: (0.45, 2.0), 0.5: (0.55, 4.0), 1.0: (0.70, 8.0)}}
  ledger = mordal.Ledger(_table_train(table))
  config = mordal.MordalConfig(fractions=(0.25, 0.5, 1.0), min_points=2)
  estimates, status = mordal.intra_cluster(["M1", "M2"], ledger, config)
  assert status["M2"]["status"] == "stopped early at fraction 0.5"
  assert status["M2"]["resumed"] == 0 and ledger.total == pytest.approx(12.0)


def test_ledger_charges_increments_and_checkpoints_only_go_forward():
  table = {"x": {0.25: (0.3, 4.0), 0.5: (0.4, 7.0), 1.0: (0.5, 12.0)}}
  ledger = mordal.Ledger(_table_train(table))
  ledger.train("x", 0.25, "t")
  ledger.train("x", 0.5, "t")
  assert ledger.total == pytest.approx(7.0)  # 4 + (7 − 4), not 4 + 7.
  assert ledger.train("x", 0.25, "t") == 0.3 and ledger.total == pytest.approx(7.0)  # Free.
  ledger.train("x", 1.0, "t")
  assert ledger.total == pytest.approx(12.0)
  led = mordal.Ledger(_table_train({"x": {0.125: (0.1, 1.0), 1.0: (0.5, 12.0)}}))
  led.train("x", 1.0, "t")
  with pytest.raises(mordal.MordalError, match=r"x: asked for fraction 0.125 after training to "
                     r"1; checkpoints only go forward"):
    led.train("x", 0.125, "t")
  bad = mordal.Ledger(_table_train({"x": {0.5: (0.1, 5.0), 1.0: (0.5, 3.0)}}))
  bad.train("x", 0.5, "t")
  with pytest.raises(mordal.MordalError, match=r"costs must be cumulative"):
    bad.train("x", 1.0, "t")


def test_clustering_matches_sklearn_and_hand_medoids():
  names = ["v0", "v1", "v2", "v3", "v4"]
  sim = np.array([[1.0, 0.9, 0.8, 0.1, 0.2],
                  [0.9, 1.0, 0.75, 0.15, 0.1],
                  [0.8, 0.75, 1.0, 0.2, 0.25],
                  [0.1, 0.15, 0.2, 1.0, 0.6],
                  [0.2, 0.1, 0.25, 0.6, 1.0]])
  dist = 1.0 - sim
  for linkage, t in (("average", 0.7), ("complete", 0.3), ("single", 0.5)):
    ours = mordal.agglomerative(names, dist, t, linkage)
    ref = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage=linkage,
                                  distance_threshold=t).fit(dist).labels_
    want = {frozenset(n for n, l in zip(names, ref) if l == lab) for lab in set(ref)}
    assert {frozenset(c) for c in ours} == want, linkage
  assert mordal.agglomerative(names, dist, 0.7) == [["v0", "v1", "v2"], ["v3", "v4"]]
  # Summed distances in {v0, v1, v2}: v0 0.1 + 0.2 = 0.3, v1 0.1 + 0.25, v2 0.2 + 0.25.
  assert mordal.medoid(["v0", "v1", "v2"], names, dist) == "v0"


def test_llm_clusters_follow_the_medoids_own_similarity():
  cands = {(v, l): f"{v}+{l}" for v in ("va", "vb") for l in ("l0", "l1", "l2")}
  vision = np.array([[1.0, 0.1], [0.1, 1.0]])
  llms = ["l0", "l1", "l2"]
  through_va = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]])
  through_vb = np.array([[1.0, 0.1, 0.1], [0.1, 1.0, 0.9], [0.1, 0.9, 1.0]])
  clusters = mordal.two_step_clustering(
      cands, ["va", "vb"], vision, {"va": (llms, through_va), "vb": (llms, through_vb)},
      mordal.MordalConfig())
  assert [(c.vision, c.llm) for c in clusters] == [
      (["va"], ["l0", "l1"]), (["va"], ["l2"]), (["vb"], ["l0"]), (["vb"], ["l1", "l2"])]


def _run(argv):
  FLAGS.unparse_flags()
  FLAGS(["select"] + argv)
  return select.run_method()


def test_replay_config_end_to_end(tmp_path):
  out = tmp_path / "m" / "mordal.json"
  flagfile = os.path.join(REPO, "configs", "mordal_replay.flags")
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    result = _run([f"--flagfile={flagfile}", f"--output_dir={out.parent}"])
  finally:
    os.chdir(cwd)
  data = json.load(open(out))
  assert {"ranking", "top1", "cost", "grid_cost", "weighted_tau"} <= set(data)
  assert data["ranking"] == result["ranking"] and len(data["ranking"]) == 24
  _, curves = tables.read_curves(os.path.join(REPO, "configs/data/mordal_curves.csv"))
  truth = {c: per[1.0][0] for c, per in curves.items()}
  assert data["grid_cost"] == pytest.approx(sum(per[1.0][1] for per in curves.values()))
  # Cost = Σ over trained candidates of the cost of the largest fraction reached.
  want_cost = sum(curves[c][max(float(r) for r in p)][1] for c, p in data["trained"].items())
  assert data["cost"] == pytest.approx(want_cost)
  assert data["cost"] < data["grid_cost"]
  names = sorted(truth)
  pos = {c: i for i, c in enumerate(data["ranking"])}
  want_tau = scipy.stats.weightedtau([-pos[c] for c in names], [truth[c] for c in names])[0]
  assert data["weighted_tau"] == pytest.approx(want_tau, abs=1e-12)
  assert os.path.exists(tmp_path / "m" / "mordal.md")
  assert open(tmp_path / "m" / "mordal.png", "rb").read(4) == b"\x89PNG"


def _curves(tmp_path, rows, header="candidate,vision,llm,data_fraction,accuracy,cost"):
  p = tmp_path / "c.csv"
  p.write_text(header + "\n" + "\n".join(rows) + "\n")
  return str(p)


def _matrix(tmp_path, name, names, m):
  p = tmp_path / name
  p.write_text("name," + ",".join(names) + "\n" + "\n".join(
      n + "," + ",".join(str(v) for v in row) for n, row in zip(names, m)) + "\n")
  return str(p)


@pytest.mark.parametrize("case, match", [
    ("no_full", r"c.csv: 'a' has no data_fraction 1.0 row"),
    ("nan", r"c.csv:3: accuracy is nan"),
    ("fraction", r"c.csv:2: data_fraction 1.5 is not in \(0, 1\]"),
    ("vision_missing", r"vision similarity has no row for encoder\(s\) vz"),
    ("not_square", r"v.csv: 2 columns of names but 1 rows"),
    ("asymmetric", r"vision similarity: not symmetric at \(v1, v2\)"),
    ("lookup", r"c.csv: the search needs 'a' at data_fraction 0.0625, which the table lacks"),
    ("cost_order", r"c.csv: 'a' costs 1 to fraction 1 but 2 to 0.5; costs must be cumulative"),
])
def test_replay_bad_tables_are_one_clear_error(tmp_path, case, match):
  rows = ["a,v1,l1,0.5,0.4,1", "a,v1,l1,1.0,0.5,2", "b,v2,l1,0.5,0.3,1", "b,v2,l1,1.0,0.6,2"]
  vnames, vm = ["v1", "v2"], [[1.0, 0.2], [0.2, 1.0]]
  if case == "no_full":
    rows = rows[:1] + rows[2:]
  elif case == "nan":
    rows[1] = "a,v1,l1,1.0,nan,2"
  elif case == "fraction":
    rows[0] = "a,v1,l1,1.5,0.4,1"
  elif case == "vision_missing":
    rows += ["c,vz,l1,1.0,0.2,1"]
  elif case == "asymmetric":
    vm = [[1.0, 0.2], [0.3, 1.0]]
  elif case == "cost_order":
    rows[0], rows[1] = "a,v1,l1,0.5,0.4,2", "a,v1,l1,1.0,0.5,1"
  curves = _curves(tmp_path, rows)
  v = _matrix(tmp_path, "v.csv", vnames, vm)
  if case == "not_square":
    (tmp_path / "v.csv").write_text("name,v1,v2\nv1,1.0,0.2\n")
  l = _matrix(tmp_path, "l.csv", ["l1"], [[1.0]])
  config = mordal.MordalConfig(initial_budget=0.5, fractions=(0.5, 1.0), min_points=2)
  if case == "lookup":
    config = mordal.MordalConfig()
  with pytest.raises(mordal.MordalError, match=match):
    mordal_replay.replay(curves, v, [l], config)


def test_replay_of_two_files_is_the_replay_of_their_union(tmp_path):
  """One grid per LLM, given as two files, is one pool: the same search as one concatenated file."""
  one = ["a,v1,l1,0.5,0.40,1", "a,v1,l1,1.0,0.50,2", "b,v2,l1,0.5,0.30,1", "b,v2,l1,1.0,0.60,2"]
  two = ["a+l2,v1,l2,0.5,0.20,1", "a+l2,v1,l2,1.0,0.45,2", "b+l2,v2,l2,0.5,0.35,1",
         "b+l2,v2,l2,1.0,0.70,2"]
  header = "candidate,vision,llm,data_fraction,accuracy,cost\n"
  (tmp_path / "one.csv").write_text(header + "\n".join(one) + "\n")
  (tmp_path / "two.csv").write_text(header + "\n".join(two) + "\n")
  (tmp_path / "both.csv").write_text(header + "\n".join(one + two) + "\n")
  v = _matrix(tmp_path, "v.csv", ["v1", "v2"], [[1.0, 0.2], [0.2, 1.0]])
  l = _matrix(tmp_path, "l.csv", ["l1", "l2"], [[1.0, 0.1], [0.1, 1.0]])
  config = mordal.MordalConfig(initial_budget=0.5, fractions=(0.5, 1.0), min_points=2,
                               vision_threshold=0.5, llm_threshold=0.5, top_clusters=2)
  split = mordal_replay.replay([str(tmp_path / "one.csv"), str(tmp_path / "two.csv")], v, [l], config)
  union = mordal_replay.replay(str(tmp_path / "both.csv"), v, [l], config)
  assert split["inputs"]["curves"] == [str(tmp_path / "one.csv"), str(tmp_path / "two.csv")]
  del split["inputs"], union["inputs"]
  assert split == union
  assert len(split["clusters"]) == 4 and split["candidates"] == 4
  assert split["best"] == "b+l2" and split["grid_cost"] == 8.0
  # A candidate in both files is an error naming both.
  (tmp_path / "dup.csv").write_text(header + "\n".join(one[:2]) + "\n")
  with pytest.raises(mordal.MordalError, match=r"dup.csv:2: candidate 'a' is also in .*one.csv"):
    tables.read_curves([str(tmp_path / "one.csv"), str(tmp_path / "dup.csv")])
  (tmp_path / "empty.csv").write_text(header)
  with pytest.raises(mordal.MordalError, match=r"empty.csv: no rows"):
    tables.read_curves([str(tmp_path / "one.csv"), str(tmp_path / "empty.csv")])


def test_llm_similarity_per_medoid_whose_names_and_paths_contain_equals_signs(tmp_path):
  """Variant specs (``v@layer=-5``) and the CSV names made from them both contain "="."""
  rows = ["a,v@layer=-5,l1,0.5,0.4,1", "a,v@layer=-5,l1,1.0,0.5,2", "b,w,l1,0.5,0.3,1",
          "b,w,l1,1.0,0.6,2", "c,v@layer=-5,l2,0.5,0.2,1", "c,v@layer=-5,l2,1.0,0.7,2",
          "d,w,l2,0.5,0.1,1", "d,w,l2,1.0,0.2,2"]
  curves = _curves(tmp_path, rows)
  v = _matrix(tmp_path, "v.csv", ["v@layer=-5", "w"], [[1.0, 0.1], [0.1, 1.0]])
  # Through v@layer=-5 the LLMs are alike (one LLM cluster), through w they differ (two).
  near = _matrix(tmp_path, "llm_v_layer=-5.csv", ["l1", "l2"], [[1.0, 0.9], [0.9, 1.0]])
  far = _matrix(tmp_path, "llm_w.csv", ["l1", "l2"], [[1.0, 0.1], [0.1, 1.0]])
  config = mordal.MordalConfig(initial_budget=0.5, fractions=(0.5, 1.0), min_points=2,
                               vision_threshold=0.5, llm_threshold=0.5, top_clusters=3)
  out = mordal_replay.replay(curves, v, [f"v@layer=-5={near}", f"w={far}"], config)
  sizes = sorted((c["vision_medoid"], len(c["members"])) for c in out["clusters"])
  assert sizes == [("v@layer=-5", 2), ("w", 1), ("w", 1)]
  with pytest.raises(mordal.MordalError, match=r"--llm_similarity 'w=nowhere.csv': no such file"):
    mordal_replay.replay(curves, v, [f"v@layer=-5={near}", "w=nowhere.csv"], config)
  with pytest.raises(mordal.MordalError, match=r"no LLM similarity matrix for vision medoid 'w'"):
    mordal_replay.replay(curves, v, [f"v@layer=-5={near}"], config)


# --- live mode -----------------------------------------------------------------------------------

def test_live_candidates_are_every_encoder_with_every_llm_at_their_own_tower_layer():
  from vlmsel_jax.models import vlm  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.selection import mordal_live  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.training import loop  # pylint: disable=g-import-not-at-top

  grid = mordal_live.candidate_grid(["/m/vit_a", "enc@layer=-5"], ["/m/llm", "/m/llm_b"])
  assert grid == {("/m/vit_a", "/m/llm"): "vit_a+llm", ("/m/vit_a", "/m/llm_b"): "vit_a+llm_b",
                  ("enc@layer=-5", "/m/llm"): "enc@layer=-5+llm",
                  ("enc@layer=-5", "/m/llm_b"): "enc@layer=-5+llm_b"}
  with pytest.raises(mordal.MordalError, match=r"needs --vision_models and --llm_models"):
    mordal_live.candidate_grid(["/m/vit_a"], [])
  with pytest.raises(mordal.MordalError, match=r"--vision_models lists a model twice"):
    mordal_live.candidate_grid(["/m/vit_a", "/m/vit_a"], ["/m/llm"])
  # A spec's own @layer= is its tower layer; the others keep the recipe's (--vision_layer).
  base = loop.TrainConfig(vision="/m/vit_a", llm="/m/llm", stage=2, data="d", workdir="w",
                          vlm=vlm.VLMConfig(vision_layer=-2))
  own = mordal_live.candidate_config(base, "enc@layer=-5", "/m/llm_b", max_steps=3)
  assert (own.vision, own.llm, own.vlm.vision_layer, own.max_steps) == (
      "enc@layer=-5", "/m/llm_b", -5, 3)
  assert mordal_live.candidate_config(base, "/m/vit_b", "/m/llm").vlm.vision_layer == -2


def test_live_mode_trains_continuing_checkpoints_and_records_replayable_curves(tmp_path, capsys):
  """Mordal live mode on two tiny VLM candidates: real training runs, continued not restarted."""
  import json as json_lib
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import vlm_fixtures as fx  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.training import checkpoint  # pylint: disable=g-import-not-at-top

  llm = fx.tiny_llm_dir(str(tmp_path / "llm"))
  vits = [fx.tiny_vit_dir(str(tmp_path / f"vit{i}"), seed=i) for i in range(2)]
  images = tmp_path / "images"
  images.mkdir()
  records = fx.shape_records(16, "vqa")
  chats = []
  for i in range(16):
    Image.fromarray(records[i]["image"]).save(images / f"{i}.png")
    chats.append({"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the square ?"},
        {"from": "gpt", "value": records[i]["answer"]}]})
  data = tmp_path / "chat.json"
  data.write_text(json_lib.dumps(chats))
  vision_csv = tmp_path / "v.csv"
  vision_csv.write_text(f"name,{vits[0]},{vits[1]}\n{vits[0]},1,0.2\n{vits[1]},0.2,1\n")
  llm_csv = tmp_path / "l.csv"
  llm_csv.write_text(f"name,{llm}\n{llm},1\n")
  output = tmp_path / "out" / "mordal.json"
  _run(["--method=mordal", "--mordal_live", f"--vision_models={vits[0]},{vits[1]}",
        f"--llm_models={llm}",
        f"--vision_similarity={vision_csv}", f"--llm_similarity={llm_csv}",
        "--mordal_initial_budget=0.25", "--mordal_rounds=1", "--mordal_top_clusters=2",
        "--mordal_fractions=0.25,0.5,1.0", "--mordal_min_points=3",
        "--stage=2", f"--data=llava:{data}@{images}", "--data_kind=conversation",
        f"--eval_data=llava:{data}@{images}",
        "--max_steps=4", "--batch_size=8", "--max_len=32", "--learning_rate=1e-2",
        "--lora_rank=4", "--save_every=1", "--eval_limit=8", "--eval_batch_size=8",
        f"--output_dir={output.parent}"])
  payload = json_lib.loads(output.read_text())
  assert payload["mode"] == "live" and payload["grid_cost"] == 8.0
  assert set(payload["ranking"]) == {"vit0+llm", "vit1+llm"}
  curves = (tmp_path / "out" / "mordal_curves.csv").read_text().splitlines()
  assert curves[0] == "candidate,vision,llm,data_fraction,accuracy,cost"
  # Cost = steps of the largest fraction each candidate reached (checkpoints were continued).
  reached = {}
  for line in curves[1:]:
    name, _, _, fraction, _, cost = line.split(",")
    reached[name] = max(reached.get(name, 0.0), float(cost))
  assert payload["cost"] == sum(reached.values())
  for name, steps in reached.items():
    _, meta = checkpoint.restore_params(str(tmp_path / "out" / "runs" / name / "checkpoints"))
    assert meta["step"] == steps
  # A line per training call as it finished (in the curves' order): a running count (the number
  # of calls is not known in advance), what was trained, the search's cost so far against the
  # grid's, and times.
  printed = [x.split("\t") for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
  assert len(printed) == len(curves) - 1
  so_far = {}
  for i, (fields, line) in enumerate(zip(printed, curves[1:])):
    name, _, _, fraction, accuracy, cost = line.split(",")
    so_far[name] = max(so_far.get(name, 0), int(float(cost)))
    assert fields[:5] == [f"[{i + 1}] {name}", f"fraction {float(fraction):g}",
                          f"accuracy {float(accuracy):.4f}", f"steps {int(float(cost))}",
                          f"search cost {sum(so_far.values())} of grid 8 steps"]
    assert re.fullmatch(r"\(\d[^;]*; [^;]* so far\)", fields[5]), fields
  assert printed[-1][4] == f"search cost {payload['cost']:g} of grid 8 steps"


# The tables of Mordal on our trainings in studies/mordal/README.md and
# studies/mordal_two_llms/README.md: (flagfile, ground-truth stems, candidates, its pick, cost,
# grid cost).
TWO_LLM_STEMS = ["studies/mordal/data/mordal_groundtruth",
                 "studies/mordal_two_llms/data/mordal_groundtruth_gemma3"]
OWN_TRAININGS = [
    ("studies/mordal/mordal_demo.flags", ["studies/demo/data/demo_groundtruth"], 9,
     "efficientnet-lite0@layer=-2", 920.0, 1200.0),
    ("studies/mordal/mordal_trained.flags", ["studies/mordal/data/mordal_groundtruth"], 26,
     "efficientnet-lite2@res=96", 9560.0 / 3, 16640.0 / 3),
    ("studies/mordal_two_llms/mordal_two_llms.flags", TWO_LLM_STEMS, 52,
     "efficientnet-lite2@res=96", 9940.0 / 3, 52 * 640.0 / 3),
    ("studies/mordal_two_llms/mordal_two_llms_t05.flags", TWO_LLM_STEMS, 52,
     "efficientnet-lite0@layer=-4", 7800.0 / 3, 52 * 640.0 / 3),
    ("studies/mordal_two_llms/mordal_two_llms_halving_at_half.flags", TWO_LLM_STEMS,
     52, "efficientnet-lite1@res=96+gemma3-270m", 10040.0 / 3, 52 * 640.0 / 3),
]


@pytest.mark.parametrize("flagfile,stems,count,top1,cost,grid_cost", OWN_TRAININGS)
def test_replay_on_the_ground_truths_own_learning_curves(tmp_path, flagfile, stems, count, top1,
                                                         cost, grid_cost):
  """The curves are those of the committed ground-truth runs; the studies' results."""
  out = tmp_path / "replay" / "mordal.json"
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    _run([f"--flagfile={os.path.join(REPO, flagfile)}", f"--output_dir={out.parent}"])
  finally:
    os.chdir(cwd)
  data = json.load(open(out))
  runs, seed0 = {}, {}
  for stem in stems:
    with open(os.path.join(REPO, f"{stem}.csv"), newline="") as f:
      runs.update({r["candidate"]: r for r in csv.DictReader(f)})
    # Fraction 1.0 of every curve is the seed-0 run of the ground truth.
    with open(os.path.join(REPO, f"{stem}_runs.csv"), newline="") as f:
      seed0.update({r["candidate"]: float(r["accuracy"]) for r in csv.DictReader(f)
                    if r["seed"] == "0"})
  assert data["truth"] == pytest.approx(seed0) and set(seed0) == set(runs)
  assert sorted(data["ranking"]) == sorted(runs) and data["candidates"] == count
  assert (data["top1"], data["cost"], data["grid_cost"]) == (top1, pytest.approx(cost),
                                                             pytest.approx(grid_cost))
  names = sorted(seed0)
  pos = {c: i for i, c in enumerate(data["ranking"])}
  want_tau = scipy.stats.weightedtau([-pos[c] for c in names], [seed0[c] for c in names])[0]
  assert data["weighted_tau"] == pytest.approx(want_tau, abs=1e-12)


def test_similarity_csv_round_trips_names_with_commas_quotes_and_hub_ids(tmp_path):
  # Variant names use commas (enc@layer=-4,res=128) and Hub ids slashes: the writer must quote
  # them so that Mordal's reader gets back exactly the names and values written.
  names = ["efficientnet-lite0@layer=-4,res=128", "org/name@layer=-2,res=128",
           'quoted "enc",x', "a+b=c/d@e", "plain"]
  rng = np.random.default_rng(0)
  matrix = np.round(rng.uniform(size=(5, 5)), 6)
  path = tmp_path / "vision_cka.csv"
  path.write_text(report.similarity_csv(names, matrix))
  got_names, got = tables.read_similarity(str(path))
  assert got_names == names
  np.testing.assert_array_equal(got, matrix)
  # The file is plain CSV: any csv reader sees one field per name.
  header = next(csv.reader(open(path, newline="")))
  assert header == ["name", *names]


def test_live_calls_answered_before_a_kill_are_answered_from_the_journal(tmp_path, monkeypatch):
  """A search run again after a kill asks the same calls; a candidate's checkpoint may be past the
  fraction asked, so the answer comes from the journal of answered calls, not from evaluating
  that checkpoint. A torn last line (killed mid-write) is ignored; another recipe is a new call."""
  from vlmsel_jax.models import vlm  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.selection import mordal_live  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.training import evaluate_run  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.training import loop  # pylint: disable=g-import-not-at-top

  trained = []
  monkeypatch.setattr(loop, "build_model", lambda config: None)
  monkeypatch.setattr(loop, "train", lambda config, built: trained.append(
      (config.vision, config.max_steps)) or {})
  # The accuracy of "the checkpoint now": it grows with everything trained so far, as a
  # continued run's would, so re-evaluating after more training gives another answer.
  monkeypatch.setattr(evaluate_run, "evaluate", lambda config, **_: {
      "vqa_accuracy": 0.1 * len(trained) + config.max_steps / 100})
  base = loop.TrainConfig(vision="a", llm="l", stage=2, data="d", workdir=str(tmp_path / "runs"),
                          vlm=vlm.VLMConfig(vision_layer=-2), max_steps=8)
  grid = {("a", "l"): "a+l", ("b", "l"): "b+l"}

  def trainer(recipe=base):
    return mordal_live.LiveTrainer(recipe, grid, full_steps=8, eval_limit=4)

  first = trainer()
  answers = [first("a+l", 0.25), first("b+l", 0.25), first("a+l", 0.5)]
  assert trained == [("a", 2), ("b", 2), ("a", 4)]
  journal = tmp_path / "runs" / mordal_live.CALLS_FILE
  journal.write_text(journal.read_text() + '{"key": "torn')  # killed while appending
  again = trainer()
  assert [again("a+l", 0.25), again("b+l", 0.25), again("a+l", 0.5)] == answers
  assert len(trained) == 3  # nothing retrained or re-evaluated
  again("b+l", 0.5)
  assert trained[-1] == ("b", 4)
  other = trainer(dataclasses.replace(base, seed=1))
  other("a+l", 0.25)
  assert trained[-1] == ("a", 2) and len(trained) == 5
