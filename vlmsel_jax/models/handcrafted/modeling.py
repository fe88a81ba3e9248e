"""Vision towers without pretrained weights: raw pixel patches and HOG descriptors (NNX).

Both are candidates a vision-encoder search should be able to rule in or out:

* ``PixelPatches`` is the encoder-free design (Fuyu-style VLMs): the image cut into
  non-overlapping p x p patches, each flattened to a token; the projector is the only learned map
  from pixels to the LLM.
* ``Hog`` is Dalal and Triggs' histogram of oriented gradients, computed exactly as
  scikit-image's ``skimage.feature.hog`` (channel of largest gradient per pixel, centred
  differences with zero borders, unsigned orientations binned without interpolation, cell means,
  L2-Hys block normalisation), so a HOG candidate is a classical, fully specified baseline.

Each returns a ``HandcraftedOutput`` whose ``hidden_states`` are NHWC grids, as EfficientNet's
are: the VLM's image tokens, the C score's patch grid and extraction's mean pooling read them the
same way. There are no parameters; the modules exist so every binary loads them through the zoo.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

POOLINGS = ("mean", "patch_grid")
BLOCK_NORMS = ("L2-Hys", "L2", "L1", "L1-sqrt")


@struct.dataclass
class HandcraftedOutput:
  """What a handcrafted tower returns; a pytree, so it passes through ``jax.jit``.

  Attributes:
    hidden_states: NHWC feature grids, the tower's default (last) one at -1.
  """

  hidden_states: tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class PixelPatchesConfig:
  """Attributes:
    patch_size: Side of the square, non-overlapping patches in pixels.
  """

  patch_size: int = 16

  def __post_init__(self):
    if self.patch_size < 1:
      raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")


class PixelPatches(nnx.Module):
  """Raw pixel patches: (B, H, W, C) → one grid (B, H/p, W/p, p·p·C), each patch row-major."""

  def __init__(self, config: PixelPatchesConfig = PixelPatchesConfig()):
    self.config = config

  @property
  def num_layers(self) -> int:
    return 1

  # The vision-tower protocol (see ``vit.Vit.patch_grid``). No classification head follows
  # the last grid, so it is the default.
  GRID_DEFAULT_LAYER = -1

  def patch_grid(self, pixels: jax.Array, layer: int) -> jax.Array:
    return self(pixels).hidden_states[layer]

  def __call__(self, pixels: jax.Array) -> HandcraftedOutput:
    b, h, w, c = pixels.shape
    p = self.config.patch_size
    if h % p or w % p:
      raise ValueError(f"a {h}x{w} image does not split into {p}x{p} patches; give an input "
                       f"side that is a multiple of {p}")
    grid = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return HandcraftedOutput(hidden_states=(grid.reshape(b, h // p, w // p, p * p * c),))


@dataclasses.dataclass(frozen=True)
class HogConfig:
  """scikit-image's ``hog`` settings (Dalal and Triggs' blocks of 2x2 cells of 8x8 pixels).

  Attributes:
    orientations: Unsigned orientation bins over [0°, 180°).
    cell_size: Side of a cell in pixels; pixels past the last whole cell are not used.
    block_size: Side of a block in cells; blocks overlap with a stride of one cell.
    block_norm: "L2-Hys" (L2, clip at 0.2, L2 again), "L2", "L1" or "L1-sqrt".
  """

  orientations: int = 9
  cell_size: int = 8
  block_size: int = 2
  block_norm: str = "L2-Hys"

  def __post_init__(self):
    if min(self.orientations, self.cell_size, self.block_size) < 1:
      raise ValueError(f"orientations ({self.orientations}), cell_size ({self.cell_size}) and "
                       f"block_size ({self.block_size}) must be >= 1")
    if self.block_norm not in BLOCK_NORMS:
      raise ValueError(f"block_norm {self.block_norm!r} is not one of {', '.join(BLOCK_NORMS)}")


def _centred_differences(x: jax.Array, axis: int) -> jax.Array:
  """x[i + 1] - x[i - 1] along ``axis`` with zeros at both borders (skimage's gradient)."""
  n = x.shape[axis]
  inner = jax.lax.slice_in_dim(x, 2, n, axis=axis) - jax.lax.slice_in_dim(x, 0, n - 2, axis=axis)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 1)
  return jnp.pad(inner, pad)


def cell_histograms(pixels: jax.Array, config: HogConfig) -> jax.Array:
  """(B, H, W, C) images → (B, H // cell, W // cell, orientations) mean gradient magnitude per
  cell and orientation bin."""
  b, h, w, _ = pixels.shape
  cell = config.cell_size
  rows, cols = h // cell, w // cell
  if rows < config.block_size or cols < config.block_size:
    raise ValueError(f"a {h}x{w} image has fewer than {config.block_size} cells of {cell}x{cell} "
                     "pixels per side; give a larger input")
  g_row = _centred_differences(pixels, axis=1)
  g_col = _centred_differences(pixels, axis=2)
  # Per pixel, the channel whose gradient is largest (the first of equals, as numpy's argmax).
  best = jnp.argmax(jnp.hypot(g_row, g_col), axis=-1)[..., None]
  g_row = jnp.take_along_axis(g_row, best, axis=-1)[..., 0]
  g_col = jnp.take_along_axis(g_col, best, axis=-1)[..., 0]
  magnitude = jnp.hypot(g_row, g_col)
  orientation = jnp.mod(jnp.rad2deg(jnp.arctan2(g_row, g_col)), 180.0)
  # Bin i holds [i·w, (i + 1)·w), compared as skimage compares (no division, so a value on a bin
  # edge falls where skimage puts it; one that rounds to 180 falls in none, as there).
  width = 180.0 / config.orientations
  edges = width * jnp.arange(config.orientations + 1, dtype=orientation.dtype)
  in_bin = (orientation[..., None] >= edges[:-1]) & (orientation[..., None] < edges[1:])
  weighted = jnp.where(in_bin, magnitude[..., None], 0.0)
  weighted = weighted[:, :rows * cell, :cols * cell]
  weighted = weighted.reshape(b, rows, cell, cols, cell, config.orientations)
  return weighted.sum(axis=(2, 4)) / (cell * cell)


def normalize_blocks(histograms: jax.Array, config: HogConfig) -> jax.Array:
  """(B, rows, cols, O) cell histograms → (B, rows - k + 1, cols - k + 1, k·k·O) normalised
  blocks of k x k cells, each flattened (block row, block column, orientation) as skimage does."""
  k = config.block_size
  b, rows, cols, o = histograms.shape
  nr, nc = rows - k + 1, cols - k + 1
  blocks = jnp.stack([jnp.stack([histograms[:, i:i + nr, j:j + nc] for j in range(k)], axis=3)
                      for i in range(k)], axis=3)  # (B, nr, nc, k, k, O)
  blocks = blocks.reshape(b, nr, nc, k * k * o)
  eps = 1e-5
  if config.block_norm == "L1":
    return blocks / (jnp.abs(blocks).sum(-1, keepdims=True) + eps)
  if config.block_norm == "L1-sqrt":
    return jnp.sqrt(blocks / (jnp.abs(blocks).sum(-1, keepdims=True) + eps))
  out = blocks / jnp.sqrt(jnp.sum(blocks**2, -1, keepdims=True) + eps**2)
  if config.block_norm == "L2":
    return out
  out = jnp.minimum(out, 0.2)
  return out / jnp.sqrt(jnp.sum(out**2, -1, keepdims=True) + eps**2)


class Hog(nnx.Module):
  """HOG of (B, H, W, C) images. ``hidden_states``: the cell histograms (B, H/cell, W/cell, O),
  then the normalised blocks (B, H/cell - k + 1, W/cell - k + 1, k·k·O), the HOG descriptor."""

  def __init__(self, config: HogConfig = HogConfig()):
    self.config = config

  @property
  def num_layers(self) -> int:
    return 2

  # The vision-tower protocol (see ``vit.Vit.patch_grid``). No classification head follows
  # the last grid, so it is the default.
  GRID_DEFAULT_LAYER = -1

  def patch_grid(self, pixels: jax.Array, layer: int) -> jax.Array:
    return self(pixels).hidden_states[layer]

  def __call__(self, pixels: jax.Array) -> HandcraftedOutput:
    histograms = cell_histograms(pixels, self.config)
    return HandcraftedOutput(hidden_states=(histograms, normalize_blocks(histograms, self.config)))


# Every tower here, for callers that dispatch on the tower's type.
TOWERS = (PixelPatches, Hog)


def select_features(output: HandcraftedOutput, layer: int = -1,
                    pooling: str = "mean") -> jax.Array:
  """``"mean"``: the spatial mean of ``hidden_states[layer]`` (batch, dim); ``"patch_grid"``:
  the grid itself (batch, rows, columns, dim). Jittable (``layer`` and ``pooling`` static)."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
  h = output.hidden_states[layer]
  return jnp.mean(h, axis=(1, 2)) if pooling == "mean" else h
