"""The score binary: outputs on the synthetic pool and on banks, ground truth, bad input."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax import score
from vlmsel_jax.scoring import c_score_flags
from vlmsel_jax.scoring import flags as scoring_flags
from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import cka
from vlmsel_jax.scores import gw
from vlmsel_jax.selection import tables as sel_tables

FLAGS = flags.FLAGS
# Intervals are tested in test_uncertainty.py; here they would only add their replicates' time.
FAST = ["--gw_anneal_iterations=10", "--noprogress", "--bootstrap=0", "--permutations=0"]


def _run(argv):
  FLAGS.unparse_flags()
  FLAGS(["score"] + argv + FAST)
  return score.run()


@pytest.fixture(scope="module", name="banks")
def _banks(tmp_path_factory):
  d = tmp_path_factory.mktemp("banks")
  pool = synthetic.make_pool(n=60, seed=1)
  text = str(d / "text.safetensors")
  fb.save_bank(text, pool.text, pool.ids, {"name": "llm"})
  paths = []
  for i in (0, 5, 11):
    perm = np.random.default_rng(i).permutation(60)  # Rows stored in another order: paired by id.
    ext = ".npz" if i == 5 else ".safetensors"
    p = str(d / f"{pool.names[i]}{ext}")
    fb.save_bank(p, pool.candidates[i][perm], pool.ids[perm], {"name": pool.names[i]})
    paths.append(p)
  truth = str(d / "truth.csv")
  with open(truth, "w") as f:
    f.write("candidate,accuracy\n" + "".join(
        f"{pool.names[i]},{acc}\n" for i, acc in ((0, 0.61), (5, 0.55), (11, 0.31))))
  return pool, text, paths, truth, d


def test_synthetic_pool_outputs(tmp_path):
  out = str(tmp_path / "out")
  written = _run(["--synthetic_pool", "--synthetic_n=60", "--metrics=gw,cka,rsa,mutual_knn",
                  f"--output_dir={out}"])
  assert sorted(os.path.basename(p) for p in written) == [
      "report.md", "scores.csv", "scores.json", "scores.png", "vision_cka.csv", "vision_cka.png"]
  data = json.load(open(os.path.join(out, "scores.json")))
  assert data["candidates"][0] == "isometric" and len(data["candidates"]) == 12
  assert set(data["rankings"]) == {"gw", "cka", "rsa", "mutual_knn"}
  assert data["selected"]["gw"] == [data["rankings"]["gw"][0]]
  assert data["ranks"]["gw"][data["rankings"]["gw"][0]] == 1
  assert set(data["evaluation"]["gw"]) >= {"pearson", "spearman", "kendall", "weighted_tau", "r2",
                                           "ndcg@5", "recall@3", "top1_regret"}
  assert data["evaluation"]["cka"]["spearman"] > 0.8
  report = open(os.path.join(out, "report.md")).read()
  assert "synthetic demo pool, not real models" in report
  rows = list(csv.DictReader(open(os.path.join(out, "scores.csv"))))
  assert len(rows) == 12 and {"candidate", "gw", "rank_gw"} <= set(rows[0])
  assert open(os.path.join(out, "scores.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_banks_are_paired_by_id_and_judged_against_ground_truth(banks, tmp_path):
  pool, text, paths, truth, _ = banks
  out = str(tmp_path / "out")
  _run([f"--banks={','.join(paths)}", f"--text_bank={text}", "--metrics=gw,cka",
        f"--ground_truth={truth}", f"--output_dir={out}"])
  data = json.load(open(os.path.join(out, "scores.json")))
  assert data["candidates"] == ["isometric", "warp_1.5_noise_0.3", "random"]
  # Values equal the library functions on the correctly paired (unpermuted) features.
  want_cka = cka.linear_cka(pool.candidates[5], pool.text)
  assert data["scores"]["warp_1.5_noise_0.3"]["cka"] == pytest.approx(want_cka, rel=1e-5)
  want_gw = gw.gw_distance(pool.candidates[0], pool.text,
                           options=gw.AnnealedOptions(stage_iterations=10)).value
  assert data["scores"]["isometric"]["gw"] == pytest.approx(want_gw, rel=1e-4)
  assert data["ground_truth"] == {"isometric": 0.61, "warp_1.5_noise_0.3": 0.55, "random": 0.31}
  assert data["evaluation"]["cka"]["spearman"] == pytest.approx(1.0)
  assert "How well each score predicts the ground truth" in open(os.path.join(out, "report.md")).read()
  # The candidates' CKA with one another, in the square table Mordal's replay reads.
  names, matrix = sel_tables.read_similarity(os.path.join(out, "vision_cka.csv"))
  assert names == data["candidates"]
  feats = {"isometric": pool.candidates[0], "warp_1.5_noise_0.3": pool.candidates[5],
           "random": pool.candidates[11]}
  want = np.array([[cka.linear_cka(feats[a], feats[b]) for b in names] for a in names])
  np.testing.assert_allclose(matrix, want, atol=1e-6)
  np.testing.assert_array_equal(np.diag(matrix), 1.0)


def test_variant_names_with_commas_reach_mordal_intact(banks, tmp_path):
  # The project's variant syntax puts commas in names (absl list flags split --bank_names on
  # them, so the names come from each bank's 'name' metadata): vision_cka.csv must quote them.
  pool, text, _, _, _ = banks
  names = ["efficientnet-lite0@layer=-4,res=128", "org/name@layer=-2,res=128", 'q"uote,d']
  paths = []
  for i, (name, row) in enumerate(zip(names, (0, 5, 11))):
    p = str(tmp_path / f"bank{i}.safetensors")  # .npz keeps no metadata.
    fb.save_bank(p, pool.candidates[row], pool.ids, {"name": name})
    paths.append(p)
  out = str(tmp_path / "out")
  _run([f"--banks={','.join(paths)}", f"--text_bank={text}", "--metrics=cka",
        f"--output_dir={out}"])
  got, matrix = sel_tables.read_similarity(os.path.join(out, "vision_cka.csv"))
  assert got == names
  assert matrix.shape == (3, 3)
  np.testing.assert_array_equal(np.diag(matrix), 1.0)
  rows = list(csv.DictReader(open(os.path.join(out, "scores.csv"), newline="")))
  assert [r["candidate"] for r in rows] == names


def _bad_bank(d, name, features, ids=None):
  p = str(d / name)
  fb.save_bank(p, features, np.arange(len(features)) if ids is None else ids)
  return p


@pytest.mark.parametrize("case, match", [
    ("nan", r"nan.npz: NaN values in 1 of 60 rows \(first at row 3\)"),
    ("ids", r"ids.npz: pair ids do not match .*text.safetensors: 1 of 60 ids missing"),
    ("small", r"text3.npz: needs at least 4 samples, got 3"),
    ("constant", r"constant.npz: all 60 samples are identical"),
    ("missing", r"gone.npz: feature bank file not found"),
    ("metric", r"unknown metric\(s\) gww"),
    ("empty", r"no candidates"),
    ("truth", r"truth.csv: ground truth has no accuracy for candidate\(s\) nan \(its "
              r"candidates: "),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(banks, tmp_path, case, match):
  pool, text, paths, truth, d = banks
  args = {"metric": "--metrics=gw,gww"}.get(case, "--metrics=cka")
  cands = {
      "nan": lambda: _bad_bank(tmp_path, "nan.npz", np.where(np.arange(60)[:, None] == 3, np.nan, pool.candidates[1])),
      "ids": lambda: _bad_bank(tmp_path, "ids.npz", pool.candidates[1], np.arange(1, 61)),
      "small": lambda: _bad_bank(tmp_path, "small.npz", pool.candidates[1][:3]),
      "constant": lambda: _bad_bank(tmp_path, "constant.npz", np.ones((60, 4), np.float32)),
      "missing": lambda: str(tmp_path / "gone.npz"),
      "metric": lambda: paths[0],
      "empty": lambda: "",
      "truth": lambda: _bad_bank(tmp_path, "nan.npz", pool.candidates[1]),
  }[case]()
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  argv = [f"--banks={cands}", f"--text_bank={text}", args, f"--output_dir={out}"]
  if case == "truth":
    argv.append(f"--ground_truth={truth}")
  if case == "small":
    argv[1] = f"--text_bank={_bad_bank(tmp_path, 'text3.npz', pool.text[:3])}"
  with pytest.raises(ValueError, match=match):
    _run(argv)
  assert sorted(os.listdir(out)) == ["keep.txt"]
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_cli_error_is_one_line_and_nonzero(banks, tmp_path):
  _, text, _, _, _ = banks
  bad = _bad_bank(tmp_path, "nan.npz", np.full((60, 3), np.nan, np.float32))
  proc = subprocess.run(
      [sys.executable, "-m", "vlmsel_jax.score", f"--banks={bad}", f"--text_bank={text}",
       "--metrics=cka", f"--output_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith("score: error:")]
  assert errors == [f"score: error: {bad}: NaN values in 60 of 60 rows (first at row 0)"]
  assert not (tmp_path / "out").exists()


def test_bad_flag_value_is_rejected_by_absl(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "vlmsel_jax.score", "--synthetic_pool", "--knn_k=0",
       f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "flag --knn_k=0: 0 is not a positive integer" in proc.stderr


def test_helpfull_documents_every_flag():
  proc = subprocess.run([sys.executable, "-m", "vlmsel_jax.score", "--helpfull"],
                        capture_output=True, text=True, timeout=120)
  text = " ".join((proc.stdout + proc.stderr).split())
  # The binary's own flags and those of the library flag modules it reads.
  ours = [flag for module in (score, scoring_flags, c_score_flags)
          for flag in FLAGS.get_flags_for_module(module)]
  assert len(ours) >= 30
  for flag in ours:
    shown = f"--[no]{flag.name}:" if flag.boolean else f"--{flag.name}:"
    assert shown in text, flag.name
    assert flag.help and " ".join(flag.help.split())[:30] in text, flag.name


def test_ties_are_reported_as_ties_never_broken_by_name_order(tmp_path):
  """Two candidates with the same features score the same under every metric: both are
  selected, share their rank, and the report says "tie of 2" whichever is listed first."""
  from vlmsel_jax.scoring import pool as scoring_pool  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.scoring import report  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  text = rng.normal(size=(40, 6))
  twin = text @ rng.normal(size=(6, 5)) + 0.1 * rng.normal(size=(40, 5))
  other = rng.normal(size=(40, 5))
  for names in (["twin_a", "twin_b", "other"], ["other", "twin_b", "twin_a"]):
    feats = {"twin_a": twin, "twin_b": twin.copy(), "other": other}
    result = scoring_pool.score_pool(names, [feats[n] for n in names], text,
                                     ["cka", "rsa"], show_progress=False,
                                     ground_truth={"twin_a": 0.7, "twin_b": 0.7, "other": 0.2})
    for m in ("cka", "rsa"):
      assert result.selected[m] == [n for n in names if n.startswith("twin")]
      assert result.ranks[m] == {"twin_a": 1, "twin_b": 1, "other": 3}
    md = report.report_markdown(result, title="t")
    tied = ", ".join(f"**{n}**" for n in names if n.startswith("twin")) + " (tie of 2)"
    assert f"| cka (linear CKA) | {tied} | higher is better |" in md.splitlines()
    assert f"actually trained best are {tied} (0.7000)" in md
    rows = {r["candidate"]: r for r in csv.DictReader(io.StringIO(report.scores_csv(result)))}
    assert rows["twin_a"]["rank_cka"] == rows["twin_b"]["rank_cka"] == "1"
    assert rows["other"]["rank_cka"] == "3"
