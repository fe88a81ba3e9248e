"""The demo pipeline end to end on a shrunken setting: three tiny vision candidates (two ViTs, one
of them also at another layer) and a tiny LLM on a few easy-vqa samples.

``groundtruth`` trains stage 1 + stage 2 per candidate and writes the ground-truth CSV; a second
call adds a seed for one candidate (the others are skipped, not retrained) and the summary
gains its seed-to-seed spread; ``score`` then extracts the banks, computes the training-free
scores and the C score, reads the ground truth and its A scores, and writes the report that
says which candidate GW selects and which trained best. Same binaries and flags as
configs/demo.flags and studies/demo/demo_groundtruth.flags, with tiny models and budgets.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest
from absl import flags

import vlm_fixtures as fx
from vlmsel_jax import groundtruth
from vlmsel_jax import score
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import groundtruth as gt
from vlmsel_jax.training import loop

FLAGS = flags.FLAGS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None,
                                reason="needs the easy-vqa package: pip install easy-vqa")


def _run(module, argv, monkeypatch=None):
  if monkeypatch is not None:  # The command line groundtruth records.
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
  FLAGS.unparse_flags()
  FLAGS([module.__name__] + argv)
  return module.main([module.__name__])


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  vit_a = fx.tiny_vit_dir(str(root / "vit_a"), seed=0)
  vit_b = fx.tiny_vit_dir(str(root / "vit_b"), seed=1)
  return {"root": root, "llm": fx.tiny_llm_dir(str(root / "llm")),
          "candidates": [vit_a, f"{vit_a}@layer=-2", vit_b],
          "names": ["vit_a", "vit_a@layer=-2", "vit_b"]}


def _groundtruth_flags(world, output_dir):
  return [f"--vision_models={','.join(world['candidates'])}", f"--llm_model={world['llm']}",
          "--data=easy-vqa", f"--output_dir={output_dir}", "--vision_layer=-1",
          "--image_tokens=mean",
          "--lora_rank=4",
          "--stage1_steps=2", "--stage2_steps=2", "--stage1_batch_size=8",
          "--stage2_batch_size=8", "--stage1_max_len=16", "--stage2_max_len=48",
          "--stage1_learning_rate=1e-2", "--stage2_learning_rate=1e-2", "--a_score_limit=8",
          "--vqa_limit=8", "--eval_batch_size=8", "--save_every=2", "--log_every=1"]


def test_groundtruth_then_score_report(world, capsys, monkeypatch):
  output_dir = str(world["root"] / "truth")
  output = gt.table_path(output_dir)
  assert output == os.path.join(output_dir, "groundtruth.csv")
  _run(groundtruth, _groundtruth_flags(world, output_dir) + ["--seeds=0"], monkeypatch)
  summary = _rows(output)
  assert [r["candidate"] for r in summary] == world["names"]
  for row in summary:
    assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["a_score"]) < 0
    assert row["seeds"] == "0" and row["accuracy_std"] == ""
    assert row["date"] and row["command"].startswith("python -m vlmsel_jax.groundtruth ")
    assert row["command"].endswith(" --seeds=0")
    assert row["questions"] == "8" and row["stage1_steps"] == "2"
  runs = _rows(gt.runs_path(output_dir))
  assert [(r["candidate"], r["seed"]) for r in runs] == [(n, "0") for n in world["names"]]
  # A spec's own layer, else --vision_layer: the layer the scores' banks are extracted from.
  assert [r["vision_layer"] for r in runs] == ["-1", "-2", "-1"]
  assert summary[0]["accuracy"] != summary[1]["accuracy"] or \
      summary[0]["a_score"] != summary[1]["a_score"]
  # Each run went through both stages in its own run directory; stage 2 started from stage 1.
  for name in world["names"]:
    s2 = json.load(open(os.path.join(gt.candidate_dir(output_dir, name), "seed0", "stage2",
                                     "eval.json")))
    assert s2["questions"] == 8

  # A line per run as it finishes: counted over the three, timed, with an estimate of the rest.
  lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
  assert [x.split("\t")[:2] for x in lines] == [[f"[{i + 1}/3] {n}", "seed 0"]
                                                for i, n in enumerate(world["names"])]
  assert all(re.search(r"\taccuracy \d\.\d{4}\tA -\d+\.\d{4}\t\(\d.* so far; about .* left\)$", x)
             for x in lines[:2])
  assert lines[2].endswith(" so far)")  # the last: nothing left to estimate

  # A second seed for one candidate: only that run trains; the summary gets its spread.
  flags_ = _groundtruth_flags(world, output_dir)
  flags_[0] = f"--vision_models={world['candidates'][0]}"
  _run(groundtruth, flags_ + ["--seeds=0,1"])
  printed = capsys.readouterr().out
  assert "vit_a\tseed 1" in printed
  lines = [x for x in printed.splitlines() if x.startswith("[")]
  assert len(lines) == 2
  # Seed 0 was not trained again: it counts, with its recorded numbers, but has no time.
  assert lines[0].startswith("[1/2] vit_a\tseed 0\taccuracy ")
  assert lines[0].endswith("\t(done before)")
  assert lines[1].startswith("[2/2] vit_a\tseed 1\taccuracy ") and lines[1].endswith(" so far)")
  runs = _rows(gt.runs_path(output_dir))
  assert len(runs) == 4 and (runs[-1]["candidate"], runs[-1]["seed"]) == ("vit_a", "1")
  summary = {r["candidate"]: r for r in _rows(output)}
  acc = [float(r["accuracy"]) for r in runs if r["candidate"] == "vit_a"]
  assert summary["vit_a"]["seeds"] == "0 1"
  assert float(summary["vit_a"]["accuracy"]) == pytest.approx(np.mean(acc))
  assert float(summary["vit_a"]["accuracy_std"]) == pytest.approx(np.std(acc, ddof=1), abs=1e-12)
  spread = json.load(open(gt.summary_path(output_dir)))["seed_spread"]
  assert spread["candidates_with_several_seeds"] == 1
  assert spread["max_seed_gap"] == pytest.approx(max(acc) - min(acc))

  out_dir = world["root"] / "report"
  argv = [f"--vision_models={','.join(world['candidates'])}", f"--text_model={world['llm']}",
          "--data=easy-vqa", "--max_samples=24", f"--cache_dir={world['root'] / 'cache'}",
          "--metrics=gw,cka,rsa,mutual_knn", "--knn_k=3", "--c_score_pairs=homography",
          "--c_score_images=astronaut", "--c_score_pairs_per_image=1", "--c_score_keypoints=8",
          f"--ground_truth={output}", "--ground_truth_scores=a_score", "--progress=false",
          "--bootstrap=40", "--permutations=39", "--gw_bootstrap=2", f"--output_dir={out_dir}"]
  _run(score, argv)
  result = json.load(open(out_dir / "scores.json"))
  assert result["candidates"] == world["names"]
  assert set(result["evaluation"]) == {"gw", "cka", "rsa", "mutual_knn", "a_score", "c_score"}
  truth = {r["candidate"]: float(r["accuracy"]) for r in _rows(output)}
  assert result["ground_truth"] == pytest.approx(truth)
  a_scores = {r["candidate"]: float(r["a_score"]) for r in _rows(output)}
  assert {c: s["a_score"] for c, s in result["scores"].items()} == pytest.approx(a_scores)
  assert all(0 <= s["c_score"] <= 100 for s in result["scores"].values())
  report = open(out_dir / "report.md").read()
  best = [c for c in world["names"] if truth[c] == max(truth.values())]
  gw_pick = result["selected"]["gw"]
  assert gw_pick[0] == result["rankings"]["gw"][0]
  assert "GW selects " + ", ".join(f"**{c}**" for c in gw_pick) in report
  if len(best) == 1:
    assert f"the candidate that actually trained best is **{best[0]}**" in report
  else:  # Tiny models on tiny data can tie: a tie is reported, never broken by name order.
    assert ("the candidates that actually trained best are "
            + ", ".join(f"**{c}**" for c in best) + f" (tie of {len(best)})") in report
  assert "| score | selects | its ground truth | Pearson | Spearman | weighted τ |" in report
  assert "on 24 image–caption pairs of `easy-vqa`" in report
  std = float(summary["vit_a"]["accuracy_std"])
  assert (f"standard deviation over seeds of 1 candidate(s) trained more than once is "
          f"{std:.4f} on average") in report
  assert os.path.getsize(out_dir / "scores.png") > 10_000
  # Intervals for the scores of the pairs, none for scores measured elsewhere; the judgement's
  # intervals resample vit_a's accuracy within its two seeds' spread.
  intervals = result["uncertainty"]["candidates"]["vit_a"]
  assert intervals["cka"]["ci_low"] <= intervals["cka"]["ci_high"]
  # GW has no permutation p-value: null in the JSON (NaN is not JSON).
  assert intervals["gw"]["p_value"] is None and 0 < intervals["rsa"]["p_value"] <= 1
  assert "c_score" not in intervals and "a_score" not in intervals
  assert {f"{k}_ci_low" for k in ("pearson", "spearman", "kendall", "weighted_tau")} <= set(
      result["evaluation"]["cka"])
  if float(summary["vit_a"]["accuracy_std"]) > 0:
    assert "the ground truth of vit_a redrawn within its seed noise" in report
  assert "### What each score resolves" in report

  # A re-run reuses every bank and C score (the cache), and gives the same numbers.
  _run(score, argv)
  again = json.load(open(out_dir / "scores.json"))
  assert again["scores"] == result["scores"]


def test_groundtruth_flag_errors(world, tmp_path):
  base = _groundtruth_flags(world, str(tmp_path / "gt"))
  with pytest.raises(Exception, match=r"--seeds: give distinct seeds"):
    _run(groundtruth, base + ["--seeds=1,1"])
  with pytest.raises(Exception, match=r"--output_dir is required"):
    _run(groundtruth, base + ["--output_dir="])
  with pytest.raises(Exception, match=r"--vision_models: model spec .*unknown setting"):
    _run(groundtruth, base[1:] + [f"--vision_models={world['candidates'][0]}@depth=2"])


def test_groundtruth_learning_curves_match_the_uninterrupted_run(world, tmp_path):
  """--curve_fractions stops stage 2 at each fraction to measure it; the end model is the same."""
  plain = str(tmp_path / "plain")
  curved = str(tmp_path / "curved")
  pick = [f"--vision_models={world['candidates'][0]},{world['candidates'][2]}",
          "--stage2_steps=4", "--seeds=0"]

  def flags_for(output_dir):
    base = [f for f in _groundtruth_flags(world, output_dir)
            if not f.startswith(("--vision_models", "--stage2_steps"))]
    return base + pick

  _run(groundtruth, flags_for(plain))
  _run(groundtruth, flags_for(curved) +
       ["--curve_fractions=0.25,0.5,0.6"])  # 0.5 and 0.6 are both step 2: measured once.
  plain_runs = {r["candidate"]: r for r in _rows(gt.runs_path(plain))}
  curved_runs = {r["candidate"]: r for r in _rows(gt.runs_path(curved))}
  for name in ("vit_a", "vit_b"):
    for key in ("accuracy", "a_score", "stage2_loss", "stage1_steps", "stage2_steps"):
      assert curved_runs[name][key] == plain_runs[name][key], (name, key)
  curve = _rows(gt.curves_path(curved, 0))
  offset = 2 * 8 * 16 / (8 * 48)  # Stage 1 in stage-2 steps of equal tokens.
  assert [(r["candidate"], float(r["data_fraction"]), int(r["stage2_steps"])) for r in curve] == [
      (n, r, s) for n in ("vit_a", "vit_b") for r, s in ((0.25, 1), (0.5, 2), (1.0, 4))]
  for r in curve:
    assert float(r["cost"]) == pytest.approx(offset + int(r["stage2_steps"]))
    assert r["llm"] == world["llm"] and r["seed"] == "0"
    if float(r["data_fraction"]) == 1.0:
      assert r["accuracy"] == curved_runs[r["candidate"]]["accuracy"]
  stage2_dir = os.path.join(gt.candidate_dir(curved, "vit_a"), "seed0", "stage2")
  points = [json.loads(line) for line in open(os.path.join(stage2_dir, "curve.jsonl"))]
  assert [p["step"] for p in points] == [1, 2, 4]
  # Each point keeps its first greedy answers, the full run's equal to its eval.json's.
  eval_json = json.load(open(os.path.join(stage2_dir, "eval.json")))
  assert all(len(p["examples"]) == min(gt.CURVE_EXAMPLES, len(eval_json["examples"]))
             and set(p["examples"][0]) == {"question", "prediction", "answer"} for p in points)
  assert [e["prediction"] for e in points[-1]["examples"]] == [
      e["prediction"] for e in eval_json["examples"][:gt.CURVE_EXAMPLES]]

  # Finished runs with their curves are skipped; a stage 2 trained without them cannot grow
  # one after the fact, and says so.
  _run(groundtruth, flags_for(curved) + ["--curve_fractions=0.25,0.5"])
  assert _rows(gt.curves_path(curved, 0)) == curve
  with pytest.raises(gt.GroundTruthError, match=r"past the curve point at fraction 0\.5 .* "
                     r"was never measured"):
    _run(groundtruth, flags_for(plain) + ["--curve_fractions=0.5"])
  with pytest.raises(Exception, match=r"--curve_fractions: each must be in \(0, 1\)"):
    _run(groundtruth, flags_for(plain) + ["--curve_fractions=1.0"])


def test_groundtruth_grid_of_vision_and_llm_candidates(world, tmp_path):
  """--llm_models trains every (vision, LLM) pair, named <vision>+<llm>, each with its LLM."""
  llm_b = fx.tiny_llm_dir(str(tmp_path / "llm_b"), seed=1)
  output_dir = str(tmp_path / "grid")
  output = gt.table_path(output_dir)
  argv = [f for f in _groundtruth_flags(world, output_dir)
          if not f.startswith(("--vision_models", "--llm_model="))]
  argv += [f"--vision_models={world['candidates'][0]}",
           f"--llm_models={world['llm']},{llm_b}", "--seeds=0", "--curve_fractions=0.5"]
  _run(groundtruth, argv)
  names = ["vit_a+llm", "vit_a+llm_b"]
  runs = _rows(gt.runs_path(output_dir))
  assert [(r["candidate"], r["vision"], r["llm"]) for r in runs] == [
      (names[0], world["candidates"][0], world["llm"]), (names[1], world["candidates"][0], llm_b)]
  assert [r["candidate"] for r in _rows(output)] == names
  curve = _rows(gt.curves_path(output_dir, 0))
  assert [(r["candidate"], r["llm"]) for r in curve] == [
      (names[0], world["llm"]), (names[0], world["llm"]), (names[1], llm_b), (names[1], llm_b)]
  # Each pair's checkpoints were trained with its own LLM.
  for name, llm in zip(names, (world["llm"], llm_b)):
    for stage in ("stage1", "stage2"):
      _, meta = ckpt_lib.restore_params(
          os.path.join(gt.candidate_dir(output_dir, name), "seed0", stage, loop.CHECKPOINT_DIR))
      assert meta["llm"] == llm
  with pytest.raises(Exception, match=r"--llm_models: duplicate LLMs in llm, llm"):
    _run(groundtruth, argv[:-2] + [f"--llm_models={world['llm']},{world['llm']}"])
  with pytest.raises(Exception, match=r"--llm_models: .* is a vision model, not an LLM"):
    _run(groundtruth, argv[:-2] + [f"--llm_models={world['candidates'][2]}"])
