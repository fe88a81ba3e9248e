"""Keypoint correspondence from patch features, and PCK: the C score of the Law of Vision
Representation (METHODS §4).

Given an encoder's patch-feature grids of a source and a target image and keypoints on the
source, each source keypoint's feature is compared by cosine similarity with every cell of the
target grid; the predicted target point is the (windowed) soft-argmax, or the argmax, of that
map, mapped back to target pixels. A prediction is correct at threshold ``alpha`` when it lies
closer than ``alpha * max(bbox width, bbox height)`` of the target object to the true point
(PCK, as SPair-71k evaluates it). The C score is PCK@0.10 in percent.

Coordinates. Keypoints are ``(x, y)`` pixel coordinates with pixel centres at integers (pixel
``(row i, column j)`` is the point ``x = j, y = i``), as SPair-71k annotates them. An image of
``W`` pixels across seen through a grid of ``w`` cells puts cell ``j``'s centre at
``x = (j + 0.5) W / w - 0.5``: the convention of a resize (and of ``grid_sample`` with
``align_corners=False``), so grid <-> pixel maps are affine per axis (``pixel_to_grid``,
``grid_to_pixel``). A source keypoint's feature is the bilinear interpolation of the
L2-normalised grid at its grid position (border cells repeat beyond the edge), normalised again.

Everything here is pure JAX and jittable with static shapes; keypoint counts vary per pair, so
callers pad them (``mask``) to a few bucket sizes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from vlmsel_jax.scores import linalg

METHODS = ("soft_argmax", "argmax")
ALPHAS = (0.05, 0.10, 0.15)
# Soft-argmax defaults: cosine similarities / 0.04 turn a 0.1 drop into a factor e^-2.5, so the
# weights sit on the peak's neighbourhood; the window keeps a second mode elsewhere in the image
# (a repeated part, a symmetric object) from dragging the estimate between the two.
DEFAULT_TEMPERATURE = 0.04
DEFAULT_WINDOW = 3


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x`` scaled to unit Euclidean norm along ``axis`` (all-zero vectors stay zero)."""
  x = jnp.asarray(x, jnp.float32)
  norms = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.maximum(norms, linalg.TINY_NORM)


def pixel_to_grid(points: jax.Array, image_hw, grid_hw) -> jax.Array:
  """(K, 2) pixel ``(x, y)`` → continuous grid ``(column, row)``; see the module docstring."""
  points = jnp.asarray(points, jnp.float32)
  image_hw = jnp.asarray(image_hw, jnp.float32)
  scale = jnp.asarray([grid_hw[1], grid_hw[0]], jnp.float32) / image_hw[::-1]
  return (points + 0.5) * scale - 0.5


def grid_to_pixel(points: jax.Array, image_hw, grid_hw) -> jax.Array:
  """(K, 2) continuous grid ``(column, row)`` → pixel ``(x, y)``; inverse of ``pixel_to_grid``."""
  points = jnp.asarray(points, jnp.float32)
  image_hw = jnp.asarray(image_hw, jnp.float32)
  scale = image_hw[::-1] / jnp.asarray([grid_hw[1], grid_hw[0]], jnp.float32)
  return (points + 0.5) * scale - 0.5


def sample_bilinear(grid: jax.Array, points: jax.Array) -> jax.Array:
  """Bilinear interpolation of an (h, w, D) grid at (K, 2) grid ``(column, row)`` points.

  Points beyond the outermost cell centres take the border value (clamped), like
  ``grid_sample(..., padding_mode="border", align_corners=False)``.
  """
  h, w = grid.shape[:2]
  u = jnp.clip(points[:, 0], 0.0, w - 1.0)
  v = jnp.clip(points[:, 1], 0.0, h - 1.0)
  u0 = jnp.clip(jnp.floor(u), 0, max(w - 2, 0)).astype(jnp.int32)
  v0 = jnp.clip(jnp.floor(v), 0, max(h - 2, 0)).astype(jnp.int32)
  u1 = jnp.minimum(u0 + 1, w - 1)
  v1 = jnp.minimum(v0 + 1, h - 1)
  fu = (u - u0)[:, None]
  fv = (v - v0)[:, None]
  top = grid[v0, u0] * (1 - fu) + grid[v0, u1] * fu
  bottom = grid[v1, u0] * (1 - fu) + grid[v1, u1] * fu
  return top * (1 - fv) + bottom * fv


def similarity_maps(source_grid: jax.Array, target_grid: jax.Array, source_kps: jax.Array,
                    source_hw) -> jax.Array:
  """Cosine similarity of each source keypoint's feature with every target cell.

  Args:
    source_grid: (h, w, D) patch features of the source image.
    target_grid: (h', w', D) patch features of the target image.
    source_kps: (K, 2) source keypoints, pixel ``(x, y)``.
    source_hw: (height, width) of the source image in pixels.

  Returns:
    (K, h', w') similarities in [-1, 1].
  """
  src = l2_normalize(source_grid)
  trg = l2_normalize(target_grid)
  query = l2_normalize(sample_bilinear(src, pixel_to_grid(source_kps, source_hw,
                                                          source_grid.shape[:2])))
  return jnp.einsum("kd,hwd->khw", query, trg, precision=linalg.HIGHEST)


def argmax_points(sim: jax.Array) -> jax.Array:
  """(K, h, w) maps → (K, 2) grid ``(column, row)`` of each map's maximum (first on ties)."""
  k, h, w = sim.shape
  flat = jnp.argmax(sim.reshape(k, h * w), axis=1)
  return jnp.stack([flat % w, flat // w], axis=1).astype(jnp.float32)


def soft_argmax_points(sim: jax.Array, temperature: float = DEFAULT_TEMPERATURE,
                       window: int | None = DEFAULT_WINDOW) -> jax.Array:
  """(K, h, w) maps → (K, 2) grid ``(column, row)``: the softmax(sim / temperature)-weighted
  mean of the cell centres, over the cells within ``window`` cells (Chebyshev distance) of the
  argmax, or over all cells when ``window`` is None.
  """
  k, h, w = sim.shape
  logits = sim / temperature
  if window is not None:
    peak = argmax_points(sim)
    cols = jnp.arange(w, dtype=jnp.float32)[None, None, :]
    rows = jnp.arange(h, dtype=jnp.float32)[None, :, None]
    inside = ((jnp.abs(cols - peak[:, 0, None, None]) <= window) &
              (jnp.abs(rows - peak[:, 1, None, None]) <= window))
    logits = jnp.where(inside, logits, -jnp.inf)
  weights = jax.nn.softmax(logits.reshape(k, h * w), axis=1).reshape(k, h, w)
  x = jnp.einsum("khw,w->k", weights, jnp.arange(w, dtype=jnp.float32),
                 precision=linalg.HIGHEST)
  y = jnp.einsum("khw,h->k", weights, jnp.arange(h, dtype=jnp.float32),
                 precision=linalg.HIGHEST)
  return jnp.stack([x, y], axis=1)


def predict_keypoints(source_grid: jax.Array, target_grid: jax.Array, source_kps: jax.Array,
                      source_hw, target_hw, *, method: str = "soft_argmax",
                      temperature: float = DEFAULT_TEMPERATURE,
                      window: int | None = DEFAULT_WINDOW) -> jax.Array:
  """Transfers (K, 2) source keypoints to (K, 2) predicted target pixel ``(x, y)``.

  Raises:
    ValueError: an unknown ``method`` or non-positive ``temperature``.
  """
  if method not in METHODS:
    raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
  if method == "soft_argmax" and not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  sim = similarity_maps(source_grid, target_grid, source_kps, source_hw)
  if method == "argmax":
    cells = argmax_points(sim)
  else:
    cells = soft_argmax_points(sim, temperature, window)
  return grid_to_pixel(cells, target_hw, target_grid.shape[:2])


def pck_thresholds(bbox: jax.Array, alphas: Sequence[float] = ALPHAS) -> jax.Array:
  """``alpha * max(x1 - x0, y1 - y0)`` of an ``(x0, y0, x1, y1)`` box, one per alpha."""
  bbox = jnp.asarray(bbox, jnp.float32)
  size = jnp.maximum(bbox[2] - bbox[0], bbox[3] - bbox[1])
  return jnp.asarray(alphas, jnp.float32) * size


def pck_correct(pred: jax.Array, gt: jax.Array, bbox: jax.Array,
                alphas: Sequence[float] = ALPHAS) -> jax.Array:
  """(len(alphas), K) booleans: ``||pred - gt|| < alpha * max(bbox height, width)``."""
  dist = jnp.linalg.norm(jnp.asarray(pred, jnp.float32) - jnp.asarray(gt, jnp.float32), axis=-1)
  return dist[None, :] < pck_thresholds(bbox, alphas)[:, None]


def pck(pred, gt, bbox, alphas: Sequence[float] = ALPHAS, mask=None) -> jax.Array:
  """PCK in percent, one value per alpha, over the keypoints where ``mask`` (default all)."""
  correct = pck_correct(pred, gt, bbox, alphas)
  if mask is None:
    mask = jnp.ones(correct.shape[1], bool)
  mask = jnp.asarray(mask, bool)
  hits = jnp.sum(correct & mask[None, :], axis=1)
  return 100.0 * hits / jnp.maximum(jnp.sum(mask), 1)


def pair_correct(source_grid: jax.Array, target_grid: jax.Array, source_kps: jax.Array,
                 target_kps: jax.Array, target_bbox: jax.Array, source_hw, target_hw, *,
                 method: str = "soft_argmax", temperature: float = DEFAULT_TEMPERATURE,
                 window: int | None = DEFAULT_WINDOW,
                 alphas: Sequence[float] = ALPHAS) -> tuple[jax.Array, jax.Array]:
  """One pair end to end: ``(predicted target pixels (K, 2), correct (len(alphas), K))``.

  Jittable with ``method``, ``temperature``, ``window`` and ``alphas`` static; the image sizes
  may be traced arrays.
  """
  pred = predict_keypoints(source_grid, target_grid, source_kps, source_hw, target_hw,
                           method=method, temperature=temperature, window=window)
  return pred, pck_correct(pred, target_kps, target_bbox, alphas)
