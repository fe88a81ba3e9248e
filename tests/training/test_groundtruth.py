"""The ground truth's tables (``training.groundtruth``): per-candidate means and the seed-to-seed
spread, on hand-computed cases; its candidates and file names."""

from __future__ import annotations

import pytest

from vlmsel_jax.training import groundtruth


def _run(candidate, seed, accuracy, a_score=-1.0):
  return {"candidate": candidate, "seed": seed, "accuracy": accuracy, "a_score": a_score,
          "majority_accuracy": 0.3, "questions": 300, "stage1_steps": 80, "stage2_steps": 80,
          "date": f"2026-11-2{seed}", "command": f"cmd {seed}"}


def test_summary_means_and_spread_by_hand():
  runs = [_run("b", 0, 0.70, -2.0), _run("a", 0, 0.60), _run("b", 1, 0.74, -1.0),
          _run("c", 0, 0.50), _run("c", 1, 0.56), _run("c", 2, 0.53)]
  summary, spread = groundtruth.summarize(runs, order=["a", "b", "c"])
  assert [r["candidate"] for r in summary] == ["a", "b", "c"]
  a, b, c = summary
  assert a["accuracy"] == 0.60 and a["accuracy_std"] is None and a["seeds"] == "0"
  # b: mean 0.72; sample std of (0.70, 0.74) = 0.02 * sqrt(2) = 0.028284...
  assert b["accuracy"] == pytest.approx(0.72) and b["a_score"] == pytest.approx(-1.5)
  assert b["accuracy_std"] == pytest.approx(0.0282842712, abs=1e-9)
  assert b["seeds"] == "0 1" and b["date"] == "2026-11-21" and b["command"] == "cmd 1"
  # c: mean 0.53; deviations (-0.03, 0.03, 0): sample variance 0.0018/2 -> std 0.03.
  assert c["accuracy"] == pytest.approx(0.53) and c["accuracy_std"] == pytest.approx(0.03)
  assert spread == pytest.approx({"candidates_with_several_seeds": 2,
                                  "mean_accuracy_std": (0.0282842712 + 0.03) / 2,
                                  "max_accuracy_std": 0.03, "max_seed_gap": 0.06})


def test_runs_file_round_trip_and_errors(tmp_path):
  output = str(tmp_path)
  runs = [_run("a", 0, 0.6), _run("a", 1, 0.65)]
  groundtruth.write_tables(output, runs, ["a"])
  back = groundtruth.read_runs(groundtruth.runs_path(output))
  assert [(r["candidate"], r["seed"], r["accuracy"]) for r in back] == [("a", 0, 0.6),
                                                                        ("a", 1, 0.65)]
  # Numbers come back as numbers, so a resumed run's summary JSON is the same as one written in a
  # single process.
  assert [{k: r[k] for k in ("questions", "stage1_steps", "stage2_steps")} for r in back] == [
      {"questions": 300, "stage1_steps": 80, "stage2_steps": 80}] * 2
  json_path = str(tmp_path / "groundtruth.json")
  assert groundtruth.summary_path(output) == json_path
  assert groundtruth.runs_path(output) == str(tmp_path / "groundtruth_runs.csv")
  assert [r["candidate"] for r in groundtruth.read_runs(str(tmp_path / "groundtruth_runs.csv"))
          ] == ["a", "a"]
  assert open(groundtruth.table_path(output)).readline().startswith("candidate,vision_layer,")
  first = open(json_path).read()
  groundtruth.write_tables(output, back, ["a"])
  assert open(json_path).read() == first
  assert groundtruth.read_runs(str(tmp_path / "absent.csv")) == []
  bad = tmp_path / "bad_runs.csv"
  bad.write_text("candidate,seed,accuracy\na,0,0.5\n")
  with pytest.raises(groundtruth.GroundTruthError, match=r"not a runs file of this binary \(no "
                     r"a_score column\)"):
    groundtruth.read_runs(str(bad))
  bad.write_text("candidate,seed,accuracy,a_score\na,zero,0.5,-1\n")
  with pytest.raises(groundtruth.GroundTruthError, match=r"bad_runs.csv:2: a seed, accuracy"):
    groundtruth.read_runs(str(bad))
  bad.write_text("candidate,seed,accuracy,a_score,questions\na,0,0.5,-1,many\n")
  with pytest.raises(groundtruth.GroundTruthError, match=r"bad_runs.csv:2: .* count"):
    groundtruth.read_runs(str(bad))


def test_candidates_and_their_directories():
  # Without LLMs each vision candidate trains with the one LLM and is named by the vision alone.
  assert groundtruth.candidate_grid(["v@layer=-3", "w"], ["v@layer=-3", "w"], [], [], "l") == [
      ("v@layer=-3", "v@layer=-3", "l"), ("w", "w", "l")]
  # With them, every (vision, LLM) pair, vision-major, named <vision>+<llm>.
  assert groundtruth.candidate_grid(["/m/v"], ["v"], ["/m/a", "org/b"], ["a", "org/b"]) == [
      ("v+a", "/m/v", "/m/a"), ("v+org/b", "/m/v", "org/b")]
  assert groundtruth.candidate_dir("out", "org/b") == "out/runs/org_b"
  assert groundtruth.curves_path("out", 2) == "out/groundtruth_curves_seed2.csv"
  budget = groundtruth.StageBudget(2, 1e-3, 8, 16, 0.0)
  with pytest.raises(groundtruth.GroundTruthError, match="distinct seeds"):
    groundtruth.Options(budget, budget, seeds=(1, 1))
  with pytest.raises(groundtruth.GroundTruthError, match=r"in \(0, 1\)"):
    groundtruth.Options(budget, budget, curve_fractions=(1.0,))
