"""Keypoint-correspondence pairs for the C score: SPair-71k, synthetic homographies, stereo.

Every source yields *records*, plain dicts::

  {"id": str, "source": uint8 (H, W, 3), "target": uint8 (H', W', 3),
   "source_kps": float32 (K, 2), "target_kps": float32 (K, 2),   # pixel (x, y)
   "target_bbox": float32 (4,),                                   # x0, y0, x1, y1
   "category": str}

with pixel centres at integer coordinates (``vlmsel_jax.scores.correspondence``). Homography
records also carry ``"homography"``, the 3x3 matrix taking source pixels to target pixels.

* ``spair_pairs`` / ``load_spair_pair``: the SPair-71k layout, ``PairAnnotation/<split>/*.json``
  (keys ``src_imname``, ``trg_imname``, ``category``, ``src_kps``, ``trg_kps`` as lists of
  ``[x, y]``, ``src_bndbox`` and ``trg_bndbox`` as ``[x0, y0, x1, y1]``) and
  ``JPEGImages/<category>/<name>``. Annotations are read and checked up front (cheap); images
  are decoded when a pair is loaded, and keypoints are checked against the image size then.
* ``homography_pairs``: real photos bundled with scikit-image, each warped by random
  perspective transforms with known matrices, so the ground truth is exact. The target box is
  the whole target image (there is no object box; PCK is then relative to the image size).
* ``stereo_pair``: scikit-image's rectified Middlebury motorcycle pair; keypoints are sampled
  where the left view's ground-truth disparity is finite, and the target is the same row shifted
  left by the disparity (``x_right = x_left - d``, the Middlebury convention, checked by
  photometric agreement in the tests). Target box: the whole right image.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

# scikit-image's bundled colour photos (skimage.data.<name>()); no download needed.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SPAIR_KEYS = ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "src_bndbox",
              "trg_bndbox")


class CorrespondenceDataError(ValueError):
  """A malformed pair; the message names the pair and the file."""


Record = dict[str, Any]


def check_keypoints(kps: np.ndarray, hw: tuple[int, int], what: str) -> None:
  """Raises if a keypoint lies outside the image's pixel area ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.

  Args:
    kps: (K, 2) pixel ``(x, y)``.
    hw: The image's (height, width).
    what: Names the pair and file in the message.
  """
  h, w = hw
  outside = ((kps[:, 0] < -0.5) | (kps[:, 0] > w - 0.5) | (kps[:, 1] < -0.5) |
             (kps[:, 1] > h - 0.5) | ~np.isfinite(kps).all(axis=1))
  if outside.any():
    i = int(np.flatnonzero(outside)[0])
    raise CorrespondenceDataError(
        f"{what}: keypoint {i} at (x={kps[i, 0]:g}, y={kps[i, 1]:g}) lies outside the "
        f"{w}x{h} image ({int(outside.sum())} of {len(kps)} keypoints outside)")


def _rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=2)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}")
  return np.ascontiguousarray(image[..., :3])


def _read_image(path: str, what: str) -> np.ndarray:
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise CorrespondenceDataError(f"{what}: image {path} does not exist") from None
  except OSError as e:
    raise CorrespondenceDataError(f"{what}: cannot read image {path} ({e})") from None


# ---------------------------------------------------------------------------------------------
# SPair-71k.


@dataclasses.dataclass(frozen=True)
class SpairPair:
  """One parsed SPair-71k pair annotation (images not read yet)."""

  id: str
  annotation: str  # The JSON file.
  category: str
  source_image: str
  target_image: str
  source_kps: np.ndarray
  target_kps: np.ndarray
  source_bbox: np.ndarray
  target_bbox: np.ndarray


def _points(value: Any, key: str, path: str) -> np.ndarray:
  try:
    arr = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    raise CorrespondenceDataError(f"{path}: {key} is not a list of [x, y] numbers") from None
  if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
    raise CorrespondenceDataError(f"{path}: {key} must be a list of finite [x, y] pairs, got "
                                  f"shape {arr.shape}")
  return arr.astype(np.float32)


def _box(value: Any, key: str, path: str) -> np.ndarray:
  try:
    arr = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    raise CorrespondenceDataError(f"{path}: {key} is not [x0, y0, x1, y1]") from None
  if arr.shape != (4,) or not np.isfinite(arr).all() or arr[2] < arr[0] or arr[3] < arr[1]:
    raise CorrespondenceDataError(f"{path}: {key} must be [x0, y0, x1, y1] with x1 >= x0 and "
                                  f"y1 >= y0, got {value!r}")
  return arr.astype(np.float32)


def parse_spair_annotation(path: str, root: str) -> SpairPair:
  """Reads one ``PairAnnotation/<split>/*.json`` file of an SPair-71k tree at ``root``."""
  try:
    with open(path, encoding="utf-8") as f:
      ann = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorrespondenceDataError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(ann, dict):
    raise CorrespondenceDataError(f"{path}: expected a JSON object")
  missing = [k for k in SPAIR_KEYS if k not in ann]
  if missing:
    raise CorrespondenceDataError(f"{path}: missing key(s) {', '.join(missing)}")
  src = _points(ann["src_kps"], "src_kps", path)
  trg = _points(ann["trg_kps"], "trg_kps", path)
  if len(src) != len(trg) or not len(src):
    raise CorrespondenceDataError(f"{path}: src_kps has {len(src)} keypoints and trg_kps "
                                  f"{len(trg)}; they must pair one to one (and not be empty)")
  category = str(ann["category"])
  image_dir = os.path.join(root, "JPEGImages", category)
  pair_id = os.path.splitext(os.path.basename(path))[0]
  return SpairPair(id=pair_id, annotation=path, category=category,
                   source_image=os.path.join(image_dir, str(ann["src_imname"])),
                   target_image=os.path.join(image_dir, str(ann["trg_imname"])),
                   source_kps=src, target_kps=trg,
                   source_bbox=_box(ann["src_bndbox"], "src_bndbox", path),
                   target_bbox=_box(ann["trg_bndbox"], "trg_bndbox", path))


def spair_pairs(root: str, split: str = "test", *, categories: Sequence[str] | None = None,
                limit: int | None = None) -> list[SpairPair]:
  """Parses an SPair-71k tree's pair annotations of ``split``, sorted by file name.

  Args:
    root: The directory holding ``PairAnnotation/`` and ``JPEGImages/``.
    split: ``test`` (the C score's split), ``val`` or ``trn``.
    categories: Keep only these categories.
    limit: Keep the first ``limit`` pairs (after the category filter).

  Raises:
    CorrespondenceDataError: no annotation directory or no pairs, or a malformed file.
  """
  ann_dir = os.path.join(root, "PairAnnotation", split)
  if not os.path.isdir(ann_dir):
    raise CorrespondenceDataError(f"{root}: no SPair-71k annotation directory {ann_dir}")
  files = sorted(glob.glob(os.path.join(ann_dir, "*.json")))
  pairs = []
  for path in files:
    pair = parse_spair_annotation(path, root)
    if categories and pair.category not in categories:
      continue
    pairs.append(pair)
    if limit is not None and len(pairs) >= limit:
      break
  if not pairs:
    raise CorrespondenceDataError(f"{ann_dir}: no pair annotations (*.json)"
                                  + (f" of categories {', '.join(categories)}"
                                     if categories else ""))
  return pairs


def load_spair_pair(pair: SpairPair) -> Record:
  """Decodes a pair's images and checks its keypoints lie inside them."""
  src = _read_image(pair.source_image, f"pair {pair.id} ({pair.annotation})")
  trg = _read_image(pair.target_image, f"pair {pair.id} ({pair.annotation})")
  check_keypoints(pair.source_kps, src.shape[:2],
                  f"pair {pair.id} ({pair.annotation}): src_kps in {pair.source_image}")
  check_keypoints(pair.target_kps, trg.shape[:2],
                  f"pair {pair.id} ({pair.annotation}): trg_kps in {pair.target_image}")
  return {"id": pair.id, "category": pair.category, "source": src, "target": trg,
          "source_kps": pair.source_kps, "target_kps": pair.target_kps,
          "target_bbox": pair.target_bbox}


def iter_spair(root: str, split: str = "test", **kwargs) -> Iterator[Record]:
  """``load_spair_pair`` over ``spair_pairs(root, split, **kwargs)``."""
  for pair in spair_pairs(root, split, **kwargs):
    yield load_spair_pair(pair)


# ---------------------------------------------------------------------------------------------
# Synthetic homography pairs.


def photo(name: str) -> np.ndarray:
  """A colour photo bundled with scikit-image (``skimage.data.<name>()``), uint8 (H, W, 3)."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  if not hasattr(skimage.data, name):
    raise ValueError(f"skimage.data has no image {name!r}; try one of {', '.join(PHOTOS)}")
  return _rgb(getattr(skimage.data, name)())


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """(K, 2) points ``(x, y)`` through a 3x3 homography."""
  pts = np.concatenate([np.asarray(points, np.float64), np.ones((len(points), 1))], axis=1)
  out = pts @ np.asarray(matrix, np.float64).T
  return out[:, :2] / out[:, 2:3]


def random_homography(hw: tuple[int, int], rng: np.random.Generator, strength: float = 0.1,
                      max_rotation: float = 30.0, max_scale: float = 0.25,
                      max_shift: float = 0.1) -> np.ndarray:
  """A random perspective transform of an (H, W) frame onto itself.

  The frame's corners are rotated about its centre by up to ``max_rotation`` degrees, scaled by
  a factor in ``[1 / (1 + max_scale), 1 + max_scale]`` (log-uniform), shifted by up to
  ``max_shift`` of the side, and then each moved independently by up to ``strength`` of the side
  per axis (the perspective part). Returns the 3x3 matrix mapping source pixels to target pixels.
  """
  h, w = hw
  size = np.array([w, h], np.float64)
  corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
  centre = (size - 1) / 2
  angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
  scale = np.exp(rng.uniform(-1, 1) * np.log1p(max_scale))
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  moved = (corners - centre) @ rot.T + centre + rng.uniform(-max_shift, max_shift, 2) * size
  moved += rng.uniform(-strength, strength, size=(4, 2)) * size
  return homography_from_points(corners, moved)


def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 3x3 homography (``H[2, 2] = 1``) taking 4 points ``src`` exactly onto ``dst``."""
  rows, rhs = [], []
  for (x, y), (u, v) in zip(np.asarray(src, np.float64), np.asarray(dst, np.float64)):
    rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
    rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    rhs += [u, v]
  h = np.linalg.solve(np.asarray(rows), np.asarray(rhs))
  return np.append(h, 1.0).reshape(3, 3)


def warp_image(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """The target image ``target(q) = image(H^-1 q)`` (bilinear, zeros outside), uint8."""
  from skimage import transform  # pylint: disable=g-import-not-at-top
  inverse = transform.ProjectiveTransform(matrix=np.linalg.inv(matrix))
  out = transform.warp(image, inverse, order=1, mode="constant", cval=0.0,
                       preserve_range=True)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def homography_pair(image: np.ndarray, matrix: np.ndarray, num_keypoints: int,
                    rng: np.random.Generator, pair_id: str, margin: float = 0.05) -> Record:
  """One synthetic pair: ``image``, its warp by ``matrix``, and keypoints with exact matches.

  Source keypoints are drawn uniformly over the source image, keeping those whose image under
  ``matrix`` lies inside the target with a margin of ``margin`` of the side (so that every
  target point shows image content, not the black fill).
  """
  image = _rgb(image)
  h, w = image.shape[:2]
  lo = np.array([margin * w, margin * h])
  hi = np.array([(1 - margin) * w - 1, (1 - margin) * h - 1])
  kept_src, kept_trg = [], []
  for _ in range(100):
    cand = rng.uniform(lo, hi, size=(4 * num_keypoints, 2))
    mapped = apply_homography(matrix, cand)
    ok = np.all((mapped >= lo) & (mapped <= hi), axis=1)
    kept_src.append(cand[ok])
    kept_trg.append(mapped[ok])
    if sum(len(k) for k in kept_src) >= num_keypoints:
      break
  src = np.concatenate(kept_src)[:num_keypoints]
  trg = np.concatenate(kept_trg)[:num_keypoints]
  if len(src) < num_keypoints:
    raise ValueError(f"{pair_id}: the homography leaves too little overlap for "
                     f"{num_keypoints} keypoints")
  return {"id": pair_id, "category": pair_id.split("/")[0], "source": image,
          "target": warp_image(image, matrix), "source_kps": src.astype(np.float32),
          "target_kps": trg.astype(np.float32),
          "target_bbox": np.array([0, 0, w - 1, h - 1], np.float32),
          "homography": matrix}


def homography_pairs(names: Sequence[str] = PHOTOS, *, pairs_per_image: int = 2,
                     num_keypoints: int = 50, strength: float = 0.1, max_rotation: float = 30.0,
                     max_scale: float = 0.25, max_shift: float = 0.1,
                     seed: int = 0) -> list[Record]:
  """``pairs_per_image`` random-homography pairs of each scikit-image photo in ``names``.

  ``strength``, ``max_rotation``, ``max_scale`` and ``max_shift`` are ``random_homography``'s.
  Ids are ``<photo>/<index>``; everything is drawn from ``numpy.random.default_rng(seed)``.
  """
  rng = np.random.default_rng(seed)
  records = []
  for name in names:
    image = photo(name)
    for i in range(pairs_per_image):
      matrix = random_homography(image.shape[:2], rng, strength, max_rotation, max_scale,
                                 max_shift)
      records.append(homography_pair(image, matrix, num_keypoints, rng, f"{name}/{i}"))
  return records


# ---------------------------------------------------------------------------------------------
# The stereo pair.


def stereo_correspondences(disparity: np.ndarray, num_keypoints: int,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Samples left-image points with a finite disparity whose match stays inside the image.

  Returns:
    (source (K, 2), target (K, 2)) pixel ``(x, y)``, target = ``(x - disparity, y)``.
  """
  valid = np.isfinite(disparity)
  ys, xs = np.nonzero(valid)
  d = disparity[ys, xs]
  inside = xs - d >= 0
  ys, xs, d = ys[inside], xs[inside], d[inside]
  if len(ys) < num_keypoints:
    raise ValueError(f"only {len(ys)} pixels have a valid disparity; asked for {num_keypoints}")
  pick = rng.choice(len(ys), size=num_keypoints, replace=False)
  src = np.stack([xs[pick], ys[pick]], axis=1).astype(np.float32)
  trg = np.stack([xs[pick] - d[pick], ys[pick]], axis=1).astype(np.float32)
  return src, trg


def stereo_pair(num_keypoints: int = 200, seed: int = 0) -> Record:
  """scikit-image's Middlebury motorcycle pair (left → right) with ``num_keypoints`` matches."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  left, right, disparity = skimage.data.stereo_motorcycle()
  src, trg = stereo_correspondences(np.asarray(disparity), num_keypoints,
                                    np.random.default_rng(seed))
  h, w = right.shape[:2]
  return {"id": "stereo_motorcycle", "category": "stereo", "source": _rgb(left),
          "target": _rgb(right), "source_kps": src, "target_kps": trg,
          "target_bbox": np.array([0, 0, w - 1, h - 1], np.float32)}
