"""The C score: correspondence math vs independent references, the pair sources, patch grids,
and the ``correspondence_score`` binary.

References: torch ``grid_sample`` (bilinear sampling convention), explicit NumPy loops
(similarity maps, soft-argmax, PCK), scikit-image's ``ProjectiveTransform`` (homographies), and
photometric agreement of the images at the claimed matches (homography and stereo ground truth).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from vlmsel_jax.features import patch_grid as pg
from vlmsel_jax import zoo
from vlmsel_jax.data import correspondence as data
from vlmsel_jax.scores import correspondence as corr

# float32 JAX vs float64 references on O(1) values.
TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Math.


def test_grid_pixel_maps_hand_computed():
  # 100 px across, 10 cells: cell 0's centre is at x = 4.5, cell 9's at 94.5; 40 px tall, 4 rows.
  cells = np.array([[0.0, 0.0], [9.0, 3.0], [4.5, 1.5]], np.float32)
  pixels = np.asarray(corr.grid_to_pixel(cells, (40, 100), (4, 10)))
  np.testing.assert_allclose(pixels, [[4.5, 4.5], [94.5, 34.5], [49.5, 19.5]], atol=1e-5)
  back = np.asarray(corr.pixel_to_grid(pixels, (40, 100), (4, 10)))
  np.testing.assert_allclose(back, cells, atol=1e-5)


def test_bilinear_sampling_matches_torch_grid_sample():
  rng = np.random.default_rng(0)
  h, w, d = 6, 9, 5
  grid = rng.normal(size=(h, w, d)).astype(np.float32)
  image_hw = (47, 83)
  # Inside, on the border, and beyond the outermost cell centres (border-clamped).
  pts = np.concatenate([rng.uniform([-0.5, -0.5], [82.5, 46.5], size=(40, 2)),
                        [[0, 0], [82, 46], [-0.5, 20], [82.5, 3]]]).astype(np.float32)
  ours = np.asarray(corr.sample_bilinear(jnp.asarray(grid),
                                         corr.pixel_to_grid(pts, image_hw, (h, w))))
  norm = 2 * (pts.astype(np.float64) + 0.5) / np.array([image_hw[1], image_hw[0]]) - 1
  ref = torch.nn.functional.grid_sample(
      torch.from_numpy(grid.astype(np.float64)).permute(2, 0, 1)[None],
      torch.from_numpy(norm)[None, None], mode="bilinear", padding_mode="border",
      align_corners=False)[0, :, 0].T.numpy()
  np.testing.assert_allclose(ours, ref, atol=TOL)


def _ref_similarity(src_grid, trg_grid, kps, src_hw):
  """Float64 NumPy: normalise, bilinear sample via torch, normalise, dot with every cell."""
  src = src_grid / np.linalg.norm(src_grid, axis=-1, keepdims=True)
  trg = trg_grid / np.linalg.norm(trg_grid, axis=-1, keepdims=True)
  norm = 2 * (kps.astype(np.float64) + 0.5) / np.array([src_hw[1], src_hw[0]]) - 1
  q = torch.nn.functional.grid_sample(
      torch.from_numpy(src).permute(2, 0, 1)[None], torch.from_numpy(norm)[None, None],
      mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T.numpy()
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  return np.einsum("kd,hwd->khw", q, trg)


def test_similarity_maps_match_reference():
  rng = np.random.default_rng(1)
  src = rng.normal(size=(7, 8, 16))
  trg = rng.normal(size=(5, 6, 16))
  kps = rng.uniform(0, [99, 59], size=(12, 2)).astype(np.float32)
  ours = np.asarray(corr.similarity_maps(src.astype(np.float32), trg.astype(np.float32), kps,
                                         (60, 100)))
  np.testing.assert_allclose(ours, _ref_similarity(src, trg, kps, (60, 100)), atol=TOL)


def _ref_soft_argmax(sim, temperature, window):
  out = []
  for m in sim.astype(np.float64):
    r, c = np.unravel_index(np.argmax(m), m.shape)
    logits = m / temperature
    rows, cols = np.mgrid[:m.shape[0], :m.shape[1]]
    if window is not None:
      inside = (np.abs(rows - r) <= window) & (np.abs(cols - c) <= window)
      logits = np.where(inside, logits, -np.inf)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    out.append([(p * cols).sum(), (p * rows).sum()])
  return np.array(out)


@pytest.mark.parametrize("window", [None, 0, 1, 3])
def test_soft_argmax_and_argmax_match_reference(window):
  rng = np.random.default_rng(2)
  sim = np.tanh(rng.normal(size=(10, 9, 11))).astype(np.float32)
  ours = np.asarray(corr.soft_argmax_points(jnp.asarray(sim), 0.05, window))
  np.testing.assert_allclose(ours, _ref_soft_argmax(sim, 0.05, window), atol=1e-4)
  flat = sim.reshape(10, -1).argmax(1)
  np.testing.assert_array_equal(np.asarray(corr.argmax_points(jnp.asarray(sim))),
                                np.stack([flat % 11, flat // 11], 1))
  if window == 0:  # A zero window is the argmax.
    np.testing.assert_allclose(ours, np.stack([flat % 11, flat // 11], 1), atol=1e-6)


def test_pck_hand_computed_and_strict():
  bbox = np.array([10, 20, 110, 70], np.float32)  # 100 wide, 50 tall: thresholds 5, 10, 15.
  gt = np.zeros((5, 2), np.float32)
  pred = np.array([[4.9, 0], [5.1, 0], [0, 9.99], [10.5, 0], [9, 12.5]], np.float32)
  correct = np.asarray(corr.pck_correct(pred, gt, bbox))
  np.testing.assert_array_equal(correct, [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  np.testing.assert_allclose(np.asarray(corr.pck(pred, gt, bbox)), [20, 60, 80], atol=1e-4)
  np.testing.assert_allclose(np.asarray(corr.pck(pred, gt, bbox, mask=[1, 1, 0, 0, 0])),
                             [50, 100, 100], atol=1e-4)
  # Exactly on the threshold is a miss ("closer than"): 64 px box, alphas 1/8 and 1/4 -> 8, 16.
  edge = np.asarray(corr.pck_correct(np.array([[0, 8.0]], np.float32), np.zeros((1, 2)),
                                     np.array([0, 0, 64, 10], np.float32), (0.125, 0.25)))
  np.testing.assert_array_equal(edge, [[False], [True]])


def _positional_grid(points_xy: np.ndarray, freqs: np.ndarray) -> np.ndarray:
  """Random-Fourier features of pixel positions: cosine similarity peaks at equal positions."""
  proj = points_xy @ freqs.T
  return np.concatenate([np.cos(proj), np.sin(proj)], axis=-1) / np.sqrt(freqs.shape[0])


@pytest.mark.parametrize("method", ["soft_argmax", "argmax"])
def test_positional_features_score_100_on_homography_pairs(method):
  """Features that encode (source-frame) position exactly find every match: PCK 100%."""
  records = data.homography_pairs(("astronaut", "coffee", "rocket"), pairs_per_image=2,
                                  num_keypoints=40, seed=3)
  freqs = np.random.default_rng(0).normal(scale=1 / 60, size=(64, 2))
  gh = gw = 32
  rows, cols = np.mgrid[:gh, :gw]
  cells = np.stack([cols.ravel(), rows.ravel()], 1).astype(np.float32)
  for rec in records:
    hw = rec["source"].shape[:2]
    centres = np.asarray(corr.grid_to_pixel(cells, hw, (gh, gw)), np.float64)
    src_grid = _positional_grid(centres, freqs).reshape(gh, gw, -1)
    # A target cell's feature is the position it shows in the source frame: H^-1 of its centre.
    back = data.apply_homography(np.linalg.inv(rec["homography"]), centres)
    trg_grid = _positional_grid(back, freqs).reshape(gh, gw, -1)
    pred, correct = corr.pair_correct(
        jnp.asarray(src_grid, jnp.float32), jnp.asarray(trg_grid, jnp.float32),
        rec["source_kps"], rec["target_kps"], rec["target_bbox"], hw, rec["target"].shape[:2],
        method=method)
    assert np.asarray(correct).all(), (rec["id"], np.asarray(correct).mean(1))


@pytest.fixture(scope="module", name="lite0")
def _lite0():
  return zoo.load("efficientnet-lite0")


def test_identical_images_score_100(lite0):
  """Source = target: every keypoint on a cell centre is found exactly by argmax (100% at every
  threshold) and within PCK@0.10 by soft-argmax. (Between centres a match can only be placed to
  the grid's resolution, 32 px of the 224 px input here.)"""
  for name in ("astronaut", "chelsea"):
    img = data.photo(name)
    hw = img.shape[:2]
    grid = pg.patch_grid(lite0, pg.resize_for_grid(lite0, img)[None])[0]
    h, w = grid.shape[:2]
    rows, cols = np.mgrid[:h, :w]
    kps = corr.grid_to_pixel(np.stack([cols.ravel(), rows.ravel()], 1), hw, (h, w))
    bbox = np.array([0, 0, hw[1] - 1, hw[0] - 1], np.float32)
    pred, correct = corr.pair_correct(grid, grid, kps, kps, bbox, hw, hw, method="argmax")
    np.testing.assert_allclose(np.asarray(pred), np.asarray(kps), atol=1e-3)
    assert np.asarray(correct).all()
    _, correct = corr.pair_correct(grid, grid, kps, kps, bbox, hw, hw, method="soft_argmax")
    assert np.asarray(correct)[1].all()


def test_patch_grid_layers(lite0):
  x = pg.resize_for_grid(lite0, data.photo("coffee"))[None]
  assert x.shape == (1, 224, 224, 3)
  out = lite0.model(x)
  default = pg.patch_grid(lite0, x)
  assert default.shape == (1, 7, 7, 320)  # The last MBConv stage: "second-to-last layer".
  np.testing.assert_array_equal(np.asarray(default), np.asarray(out.hidden_states[-2]))
  assert pg.patch_grid(lite0, x, -4).shape == (1, 14, 14, 112)
  jitted = pg.patch_grid_fn(lite0)(x)
  # jit fuses differently: float32 round-off on values of a few units.
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(default), rtol=1e-5, atol=5e-5)
  with pytest.raises(ValueError, match="out of range"):
    pg.patch_grid(lite0, x, 8)


def test_patch_grid_vit_drops_prefix_tokens():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.models.vit import modeling as vit  # pylint: disable=g-import-not-at-top
  cfg = vit.VitConfig(variant="dinov2", hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, image_size=(28, 42), patch_size=(7, 7), num_register_tokens=2)
  model = vit.Vit(cfg, rngs=nnx.Rngs(0))
  loaded = zoo.vit_model("tiny", model, zoo.default_preprocessing("dinov2", cfg.image_size))
  x = np.random.default_rng(0).normal(size=(2, 28, 42, 3)).astype(np.float32)
  grid = np.asarray(pg.patch_grid(loaded, x))
  hidden = np.asarray(model(x).hidden_states[-2])  # (2, 1 + 2 + 4 * 6, 32)
  assert grid.shape == (2, 4, 6, 32)
  # Token 3 + 6 r + c (after CLS and two registers) is patch (r, c).
  np.testing.assert_array_equal(grid[:, 2, 5], hidden[:, 3 + 6 * 2 + 5])
  np.testing.assert_array_equal(grid.reshape(2, 24, 32), hidden[:, 3:])


# ---------------------------------------------------------------------------------------------
# Pair sources.


def _bilinear(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  return np.stack([ndimage.map_coordinates(img[..., ch].astype(np.float64),
                                           [pts[:, 1], pts[:, 0]], order=1)
                   for ch in range(3)], axis=1)


def test_homography_pairs_ground_truth():
  from skimage import transform  # pylint: disable=g-import-not-at-top
  recs = data.homography_pairs(("chelsea", "coffee"), pairs_per_image=2, num_keypoints=60,
                               seed=5)
  assert [r["id"] for r in recs] == ["chelsea/0", "chelsea/1", "coffee/0", "coffee/1"]
  for rec in recs:
    h, w = rec["source"].shape[:2]
    assert rec["target"].shape == rec["source"].shape and rec["target"].dtype == np.uint8
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
    moved = data.apply_homography(rec["homography"], corners)
    ref = transform.ProjectiveTransform.from_estimate(corners, moved)
    np.testing.assert_allclose(ref(rec["source_kps"].astype(np.float64)), rec["target_kps"],
                               atol=1e-3)
    # The images agree at the matches (bilinear warp: small differences only) and not at
    # unrelated points.
    src = _bilinear(rec["source"], rec["source_kps"])
    trg = _bilinear(rec["target"], rec["target_kps"])
    assert np.abs(src - trg).mean() < 6.0
    assert np.abs(src - trg[::-1]).mean() > 4 * np.abs(src - trg).mean()
    np.testing.assert_array_equal(rec["target_bbox"], [0, 0, w - 1, h - 1])
  again = data.homography_pairs(("chelsea", "coffee"), pairs_per_image=2, num_keypoints=60,
                                seed=5)
  np.testing.assert_array_equal(again[3]["target_kps"], recs[3]["target_kps"])


def test_stereo_pair_ground_truth():
  rec = data.stereo_pair(num_keypoints=300, seed=1)
  left, right = rec["source"], rec["target"]
  np.testing.assert_array_equal(rec["source_kps"][:, 1], rec["target_kps"][:, 1])
  assert (rec["target_kps"][:, 0] <= rec["source_kps"][:, 0]).all()
  assert (rec["target_kps"][:, 0] >= 0).all()
  err = np.abs(_bilinear(left, rec["source_kps"]) - _bilinear(right, rec["target_kps"])).mean()
  # Shifting the other way (x + d) is the wrong convention: much larger disagreement.
  wrong = rec["source_kps"].copy()
  wrong[:, 0] = np.minimum(2 * rec["source_kps"][:, 0] - rec["target_kps"][:, 0],
                           left.shape[1] - 1)
  err_wrong = np.abs(_bilinear(left, rec["source_kps"]) - _bilinear(right, wrong)).mean()
  assert err < 12 and err_wrong > 2.5 * err


def test_stereo_correspondences_hand_built():
  disp = np.full((4, 6), np.inf, np.float32)
  disp[1, 4] = 2.5
  disp[2, 1] = 3.0  # Would land at x = -2: dropped.
  src, trg = data.stereo_correspondences(disp, 1, np.random.default_rng(0))
  np.testing.assert_array_equal(src, [[4, 1]])
  np.testing.assert_array_equal(trg, [[1.5, 1]])
  with pytest.raises(ValueError, match="only 1 pixels"):
    data.stereo_correspondences(disp, 2, np.random.default_rng(0))


def _write_spair(root, pairs):
  """A small SPair-71k tree: PairAnnotation/test/<id>.json and JPEGImages/<category>/<name>."""
  ann_dir = root / "PairAnnotation" / "test"
  ann_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for pair_id, ann, sizes in pairs:
    img_dir = root / "JPEGImages" / ann["category"]
    img_dir.mkdir(parents=True, exist_ok=True)
    for key, (h, w) in zip(("src_imname", "trg_imname"), sizes):
      Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(
          img_dir / ann[key])
    (ann_dir / f"{pair_id}.json").write_text(json.dumps(ann))


def _ann(category, src, trg, src_kps, trg_kps, trg_box=(5, 6, 60, 40)):
  return {"src_imname": src, "trg_imname": trg, "category": category, "src_kps": src_kps,
          "trg_kps": trg_kps, "src_bndbox": [0, 0, 30, 30], "trg_bndbox": list(trg_box),
          "src_imsize": [64, 48, 3], "trg_imsize": [80, 50, 3], "kps_ids": [0, 1]}


def test_spair_layout_round_trip(tmp_path):
  _write_spair(tmp_path, [
      ("000002-b1-b2:bird",
       _ann("bird", "b1.jpg", "b2.jpg", [[1, 2], [63, 47]], [[3, 4], [79, 49]]),
       ((48, 64), (50, 80))),
      ("000001-c1-c2:cat", _ann("cat", "c1.jpg", "c2.jpg", [[10, 11]], [[12, 13]]),
       ((48, 64), (50, 80))),
  ])
  pairs = data.spair_pairs(str(tmp_path))
  assert [p.id for p in pairs] == ["000001-c1-c2:cat", "000002-b1-b2:bird"]
  rec = data.load_spair_pair(pairs[1])
  assert rec["source"].shape == (48, 64, 3) and rec["target"].shape == (50, 80, 3)
  np.testing.assert_array_equal(rec["source_kps"], [[1, 2], [63, 47]])
  np.testing.assert_array_equal(rec["target_kps"], [[3, 4], [79, 49]])
  np.testing.assert_array_equal(rec["target_bbox"], [5, 6, 60, 40])
  assert rec["category"] == "bird" and rec["id"] == "000002-b1-b2:bird"
  assert [p.id for p in data.spair_pairs(str(tmp_path), categories=["bird"])] == [
      "000002-b1-b2:bird"]
  assert len(list(data.iter_spair(str(tmp_path), limit=1))) == 1


def test_spair_errors_name_pair_and_file(tmp_path):
  _write_spair(tmp_path, [("000001-d1-d2:dog",
                           _ann("dog", "d1.jpg", "d2.jpg", [[5, 5], [70, 5]], [[1, 1], [2, 2]]),
                           ((48, 64), (50, 80)))])
  pair = data.spair_pairs(str(tmp_path))[0]
  with pytest.raises(data.CorrespondenceDataError) as e:
    data.load_spair_pair(pair)
  msg = str(e.value)
  assert "000001-d1-d2:dog" in msg and "d1.jpg" in msg and "keypoint 1" in msg
  assert "outside the 64x48 image" in msg

  bad = tmp_path / "PairAnnotation" / "test" / "000002-x:dog.json"
  bad.write_text(json.dumps({"src_imname": "d1.jpg", "category": "dog"}))
  with pytest.raises(data.CorrespondenceDataError, match="000002-x:dog.json: missing key"):
    data.spair_pairs(str(tmp_path))
  bad.write_text(json.dumps(_ann("dog", "d1.jpg", "nope.jpg", [[1, 1]], [[1, 1], [2, 2]])))
  with pytest.raises(data.CorrespondenceDataError, match="src_kps has 1 keypoints and trg_kps 2"):
    data.spair_pairs(str(tmp_path))
  bad.write_text(json.dumps(_ann("dog", "d1.jpg", "nope.jpg", [[1, 1]], [[1, 1]])))
  pair = data.spair_pairs(str(tmp_path))[1]
  with pytest.raises(data.CorrespondenceDataError, match=r"nope\.jpg does not exist"):
    data.load_spair_pair(pair)
  with pytest.raises(data.CorrespondenceDataError, match="no SPair-71k annotation directory"):
    data.spair_pairs(str(tmp_path / "elsewhere"))


# ---------------------------------------------------------------------------------------------
# The binary.


def _run_binary(*args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "vlmsel_jax.correspondence_score", *args,
                         "--noprogress"], capture_output=True, text=True, env=env, cwd=cwd,
                        timeout=300)


def test_binary_homography_and_spair(tmp_path, lite0):
  out = tmp_path / "c"
  proc = _run_binary("--vision_models=efficientnet-lite0", "--c_score_pairs=homography",
                     "--c_score_images=astronaut", "--c_score_pairs_per_image=2",
                     "--c_score_keypoints=20", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  payload = json.loads((out / "c_scores.json").read_text())
  r = payload["models"]["efficientnet-lite0"]
  assert r["keypoints"] == 40 and r["pairs"] == 2 and r["grid"] == [7, 7] and r["layer"] == -2
  assert r["pck@0.05"] <= r["pck@0.10"] <= r["pck@0.15"] and r["c_score"] == r["pck@0.10"]
  # The same numbers from the library on the same records.
  recs = data.homography_pairs(("astronaut",), pairs_per_image=2, num_keypoints=20, seed=0)
  from vlmsel_jax.scoring import c_score  # pylint: disable=g-import-not-at-top
  lib = c_score.score_records(lite0, recs)
  for key in ("pck@0.05", "pck@0.10", "pck@0.15"):
    assert r[key] == pytest.approx(lib[key], abs=1e-9)
  rows = list(csv.DictReader(open(out / "c_scores.csv")))
  assert rows[0]["model"] == "efficientnet-lite0"
  assert float(rows[0]["pck@0.10"]) == pytest.approx(r["pck@0.10"])

  spair = tmp_path / "spair"
  _write_spair(spair, [("000001-e1-e2:cat", _ann("cat", "e1.jpg", "e2.jpg",
                                                 [[1, 2], [40, 30]], [[3, 4], [70, 45]]),
                        ((48, 64), (50, 80)))])
  proc = _run_binary("--vision_models=efficientnet-lite0", f"--c_score_pairs=spair:{spair}",
                     f"--output_dir={tmp_path / 's'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  s = json.loads((tmp_path / "s" / "c_scores.json").read_text())["models"]["efficientnet-lite0"]
  assert s["keypoints"] == 2 and s["per_category"]["cat"]["keypoints"] == 2

  # A keypoint outside its image: one line naming the pair and the file; nothing written.
  _write_spair(spair, [("000002-e1-e2:cat", _ann("cat", "e1.jpg", "e2.jpg",
                                                 [[1, 2]], [[300, 4]]), ((48, 64), (50, 80)))])
  proc = _run_binary("--vision_models=efficientnet-lite0", f"--c_score_pairs=spair:{spair}",
                     f"--output_dir={tmp_path / 'bad'}")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert "000002-e1-e2:cat" in last and "e2.jpg" in last and "outside" in last
  assert not (tmp_path / "bad").exists()
