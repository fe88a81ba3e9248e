"""Judging rankings (--method=judge): metrics vs scipy / scikit-learn, tables, errors."""

import csv
import itertools
import json
import os

import numpy as np
import pytest
import scipy.stats
from absl import flags
from sklearn.metrics import ndcg_score

from vlmsel_jax.scoring import report
from vlmsel_jax.scoring import pool as scoring
from vlmsel_jax import select
from vlmsel_jax.selection import judge

FLAGS = flags.FLAGS

CANDS = ["a", "b", "c", "d", "e"]
TRUTH = {"vqa": [0.61, 0.55, 0.70, 0.31, 0.48], "gqa": [0.40, 0.52, 0.45, 0.20, 0.33]}
SCORES = {"vqa": [0.9, 0.4, 0.8, 0.1, 0.5], "gqa": [0.2, 0.6, 0.7, 0.1, 0.3]}


def _write(path, header, rows):
  with open(path, "w") as f:
    f.write(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
  return str(path)


@pytest.fixture(name="tables")
def _tables(tmp_path):
  truth = _write(tmp_path / "truth.csv", "candidate,task,accuracy",
                 [(c, t, TRUTH[t][i]) for t in TRUTH for i, c in enumerate(CANDS)])
  scores = _write(tmp_path / "myscore.csv", "task,candidate,score",
                  [(t, c, SCORES[t][i]) for t in SCORES for i, c in enumerate(CANDS)])
  return truth, scores


def _run(argv):
  FLAGS.unparse_flags()
  FLAGS(["select", "--method=judge"] + argv)
  return select.run_method()


def _reference(true, score):
  """Every metric from scipy / scikit-learn (an independent computation)."""
  true, score = np.asarray(true), np.asarray(score)
  best = int(np.argmax(true))
  order = np.argsort(-score, kind="stable")
  out = {
      "pearson": scipy.stats.pearsonr(score, true)[0],
      "spearman": scipy.stats.spearmanr(score, true)[0],
      "kendall": scipy.stats.kendalltau(score, true)[0],
      "weighted_tau": scipy.stats.weightedtau(score, true)[0],
      "top1_regret": true.max() - true[order[0]],
  }
  out["r2"] = out["pearson"] ** 2
  for k in (1, 3, 5):
    out[f"ndcg@{k}"] = ndcg_score([true], [score], k=k)
    out[f"recall@{k}"] = float(best in order[:k])
  return out


def test_judge_matches_scipy_and_sklearn_per_task_and_mean(tables, tmp_path):
  truth, scores = tables
  out = str(tmp_path / "out" / "judge.json")
  result = _run([f"--ground_truth={truth}", f"--scores={scores}",
                 f"--output_dir={tmp_path / 'out'}"])
  assert result["tasks"] == ["gqa", "vqa"]
  m = result["methods"]["myscore"]
  for task in TRUTH:
    ref = _reference(TRUTH[task], SCORES[task])
    for key, want in ref.items():
      assert m["per_task"][task][key] == pytest.approx(want, abs=1e-12), (task, key)
  for key in m["mean"]:
    assert m["mean"][key] == pytest.approx(
        np.mean([m["per_task"][t][key] for t in TRUTH]), abs=1e-12)
  on_disk = json.load(open(out))
  assert on_disk["methods"]["myscore"]["mean"] == pytest.approx(m["mean"])
  md = open(str(tmp_path / "out" / "judge.md")).read()
  assert "| myscore |" in md and "## Task vqa" in md
  assert open(str(tmp_path / "out" / "judge.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_score_binary_csv_per_task_and_gw_is_flipped(tables, tmp_path):
  truth, _ = tables
  specs = []
  for task in TRUTH:
    # vlmsel_jax.score's layout: metric columns, then rank_<metric>. GW: lower is better.
    gw = [1.0 - s for s in SCORES[task]]
    path = _write(tmp_path / f"scores_{task}.csv", "candidate,gw,cka,rank_gw,rank_cka",
                  [(c, gw[i], SCORES[task][i], 0, 0) for i, c in enumerate(CANDS)])
    specs.append(f"{path}:{task}")
  result = _run([f"--ground_truth={truth}", f"--scores={','.join(specs)}",
                 f"--output_dir={tmp_path}"])
  assert set(result["methods"]) == {"gw", "cka"}
  assert result["methods"]["gw"]["higher_is_better"] is False
  # 1 − score, flipped, ranks exactly as the score: every metric but Pearson's sign agrees.
  for key in ("spearman", "kendall", "weighted_tau", "ndcg@3", "recall@1", "top1_regret"):
    assert result["methods"]["gw"]["mean"][key] == pytest.approx(
        result["methods"]["cka"]["mean"][key], abs=1e-12), key


def test_k_flag_adds_its_cutoff(tables, tmp_path):
  truth, scores = tables
  result = _run([f"--ground_truth={truth}", f"--scores={scores}", "--k=2",
                 f"--output_dir={tmp_path}"])
  want = ndcg_score([TRUTH["vqa"]], [SCORES["vqa"]], k=2)
  assert result["methods"]["myscore"]["per_task"]["vqa"]["ndcg@2"] == pytest.approx(want)


@pytest.mark.parametrize("case, match", [
    ("missing_candidate", r"myscore.csv: task 'vqa': no score for candidate\(s\) e of .*truth.csv"),
    ("extra_candidate", r"myscore.csv: task 'vqa': candidate\(s\) z have no accuracy in"),
    ("extra_task", r"myscore.csv: task\(s\) okvqa of method 'myscore' are not in the ground "
                   r"truth"),
    ("missing_task", r"method 'myscore' has no scores for task\(s\) gqa of the ground truth"),
    ("nan_score", r"myscore.csv:4: score is nan \(scores and accuracies must be finite\)"),
    ("inf_truth", r"truth.csv:3: accuracy is inf"),
    ("text_score", r"myscore.csv:2: score 'high' is not a number"),
    ("duplicate", r"myscore.csv:7: candidate 'a' appears twice for task 'vqa'"),
    ("no_column", r"myscore.csv: no 'score' column \(columns: candidate, task, value\)"),
    ("missing_file", r"gone.csv: file not found"),
])
def test_bad_tables_are_one_clear_error_and_write_nothing(tmp_path, case, match):
  truth_rows = [(c, t, TRUTH[t][i]) for t in TRUTH for i, c in enumerate(CANDS)]
  score_rows = [(c, t, SCORES[t][i]) for t in ("vqa", "gqa") for i, c in enumerate(CANDS)]
  header = "candidate,task,score"
  if case == "missing_candidate":
    score_rows = [r for r in score_rows if r[:2] != ("e", "vqa")]
  elif case == "extra_candidate":
    score_rows.append(("z", "vqa", 0.3))
  elif case == "extra_task":
    score_rows.append(("a", "okvqa", 0.3))
  elif case == "missing_task":
    score_rows = [r for r in score_rows if r[1] != "gqa"]
  elif case == "nan_score":
    score_rows[2] = (score_rows[2][0], "vqa", float("nan"))
  elif case == "inf_truth":
    truth_rows[1] = (truth_rows[1][0], truth_rows[1][1], float("inf"))
  elif case == "text_score":
    score_rows[0] = ("a", "vqa", "high")
  elif case == "duplicate":
    score_rows.insert(5, ("a", "vqa", 0.1))
  elif case == "no_column":
    header = "candidate,task,value"
  truth = _write(tmp_path / "truth.csv", "candidate,task,accuracy", truth_rows)
  scores = _write(tmp_path / "myscore.csv", header, score_rows)
  if case == "missing_file":
    scores = str(tmp_path / "gone.csv")
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(judge.JudgeError, match=match):
    _run([f"--ground_truth={truth}", f"--scores={scores}", f"--output_dir={out}"])
  assert os.listdir(out) == []


def test_score_binary_csv_needs_a_task_when_truth_has_several(tables, tmp_path):
  truth, _ = tables
  path = _write(tmp_path / "scores.csv", "candidate,cka,rank_cka",
                [(c, 0.1 * i, i) for i, c in enumerate(CANDS)])
  with pytest.raises(judge.JudgeError, match=r"scores.csv: a vlmsel_jax.score scores.csv "
                     r"holds one task; name it as .*scores.csv:TASK"):
    _run([f"--ground_truth={truth}", f"--scores={path}", f"--output_dir={tmp_path}"])


def test_same_task_from_two_files_is_an_error(tables, tmp_path):
  truth, scores = tables
  with pytest.raises(judge.JudgeError, match=r"task 'gqa' is given by both"):
    _run([f"--ground_truth={truth}", f"--scores=s={scores},s={scores}:gqa",
          f"--output_dir={tmp_path}"])


def test_constant_score_gives_nan_correlation_and_is_left_out_of_the_mean(tmp_path):
  truth = _write(tmp_path / "t.csv", "candidate,task,accuracy",
                 [(c, t, TRUTH[t][i]) for t in TRUTH for i, c in enumerate(CANDS)])
  scores = _write(tmp_path / "s.csv", "candidate,task,score",
                  [(c, t, 1.0 if t == "vqa" else SCORES[t][i])
                   for t in TRUTH for i, c in enumerate(CANDS)])
  result = _run([f"--ground_truth={truth}", f"--scores={scores}", f"--output_dir={tmp_path}"])
  m = result["methods"]["s"]
  assert np.isnan(m["per_task"]["vqa"]["spearman"])
  assert m["mean"]["spearman"] == pytest.approx(m["per_task"]["gqa"]["spearman"])
  assert m["tasks_defined"]["spearman"] == 1
  # A constant score ties all 5 candidates: the one best (c, 0.70) is the pick with probability
  # 1/5 and the regret is the mean shortfall from 0.70, whatever the candidates are called.
  vqa = m["per_task"]["vqa"]
  assert vqa["recall@1"] == pytest.approx(1.0 / 5.0)
  assert vqa["recall@3"] == pytest.approx(3.0 / 5.0)
  assert vqa["top1_regret"] == pytest.approx(np.mean([0.70 - a for a in TRUTH["vqa"]]))
  assert m["selects"] == {"vqa": CANDS, "gqa": ["c"]}
  md = open(str(tmp_path / "judge.md")).read()
  assert "| s | tie of 5: a, b, c, d, e |" in md and "| s | c |" in md


@pytest.mark.parametrize("score", [[1.0] * 5, [2.0, 2.0, 1.0, 1.0, 0.0], [0.3, 0.3, 0.9, 0.9, 0.1]],
                         ids=["constant", "two-ties", "tie-at-top"])
def test_renaming_the_candidates_never_changes_the_judgement(score):
  # Names decide the order judge_scores lists the candidates in (sorted): every assignment of
  # the names to (accuracy, score) pairs must give the same metrics, to the bit.
  true = TRUTH["vqa"]
  want = judge.judge_scores(dict(zip(CANDS, true)), dict(zip(CANDS, score)), True)
  for names in itertools.permutations(CANDS):
    got = judge.judge_scores(dict(zip(names, true)), dict(zip(names, score)), True)
    for key, value in got.items():
      assert value == want[key] or (np.isnan(value) and np.isnan(want[key])), (names, key)
    tied = judge.selects(dict(zip(names, score)), True)
    assert tied == sorted(n for n, s in zip(names, score) if s == max(score))


def test_score_binary_csv_round_trips_names_with_commas(tmp_path):
  # vlmsel_jax.score's scores.csv, written by report.scores_csv, read back by the harness.
  names = ["enc@layer=-4,res=128", 'say "hi"', "org/name@layer=-2,res=128", "a+b=c"]
  values = {"cka": dict(zip(names, [0.5, 0.9, 0.8, 0.1])),
            "gw": dict(zip(names, [0.2, 0.1, 0.3, 0.05]))}
  rankings = {"cka": [names[i] for i in (1, 2, 0, 3)], "gw": [names[i] for i in (3, 1, 0, 2)]}
  result = scoring.PoolScores(candidates=names, metrics=["cka", "gw"], values=values,
                              rankings=rankings, diagnostics={})
  path = tmp_path / "scores.csv"
  path.write_text(report.scores_csv(result))
  rows = list(csv.DictReader(open(path, newline="")))
  assert [r["candidate"] for r in rows] == names
  assert [int(r["rank_cka"]) for r in rows] == [3, 1, 2, 4]
  assert [int(r["rank_gw"]) for r in rows] == [3, 2, 4, 1]  # GW: lower is better
  methods = judge.read_score_binary_csv(str(path), "vqa")
  assert {m.name: m.values["vqa"] for m in methods} == values
