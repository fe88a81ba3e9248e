"""A multi-encoder vision tower (NNX): several towers' patch grids on one common grid,
concatenated along the feature dimension.

This is the "C+D" tower of the Law of Vision Representation (CLIP and DINOv2 features side by
side) and Cambrian's encoder combinations: every member sees the same image through its own
preprocessing, its grid at its own layer is resampled to the common grid, and the grids are
concatenated channel-wise, so a downstream projector sees one token per common-grid cell whose
features are the members' features at that image location.

Input layout. A vision tower takes one (batch, height, width, 3) array (the VLM, feature
extraction and the C score all hand it ``pixels``), but the members want different inputs
(sizes, means, crops). The input is therefore a *canvas*: the members' preprocessed inputs placed
side by side, left to right, each at the top of the canvas (``boxes``: (top, left, height, width)
per member; the rest is padding that no member reads). ``zoo.multi.MultiPreprocessing`` builds
it from a PIL image; ``patch_grid`` cuts it apart again with static slices, so the tower still
jit-compiles once per batch shape, and every consumer that only knows ``(h, w, 3)`` arrays
works unchanged.

Resampling. Each member's grid goes to the common ``grid`` (rows, columns) by
``jax.image.resize(method="linear", antialias=True)``: bilinear with half-pixel centres, so cell
centres of every grid map to the same image positions (the C score's pixel ↔ grid map stays an
affine map per axis), and antialiased, so a grid reduced to fewer cells averages every cell under
each output cell instead of skipping some (when enlarging, antialiasing changes nothing). A grid
already of the common size is passed through untouched.

Layers. The members' layers are fixed when the tower is built (each member's ``@layer=``, else
its own ``GRID_DEFAULT_LAYER``), so the tower has exactly one layer, ``LAYER`` (-1, also reachable
as 0): ``patch_grid(pixels, -1)``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# The tower's one layer: its members' layers are part of the tower.
LAYER = -1
NUM_LAYERS = 1


def resample_grid(grid: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(batch, rows, cols, dim) → (batch, size[0], size[1], dim) float32, bilinear (half-pixel
  centres), antialiased when reducing; a grid of that size already is only cast."""
  grid = grid.astype(jnp.float32)
  b, h, w, d = grid.shape
  if (h, w) == tuple(size):
    return grid
  return jax.image.resize(grid, (b, size[0], size[1], d), method="linear", antialias=True)


class MultiTower(nnx.Module):
  """Member towers → their grids at their own layers, resampled to ``grid``, concatenated.

  Attributes:
    members: The member towers (each with the vision-tower protocol: ``patch_grid``).
    member_layers: Each member's layer (index into its own hidden states).
    boxes: Each member's input on the canvas: (top, left, height, width).
    grid: The common (rows, columns).
  """

  GRID_DEFAULT_LAYER = LAYER

  def __init__(self, members: Sequence[nnx.Module], member_layers: Sequence[int],
               boxes: Sequence[tuple[int, int, int, int]], grid: tuple[int, int]):
    if len(members) < 2:
      raise ValueError(f"a multi-encoder tower needs two or more members, got {len(members)}")
    if not len(members) == len(member_layers) == len(boxes):
      raise ValueError(f"{len(members)} members, {len(member_layers)} layers and {len(boxes)} "
                       "input boxes: give one of each per member")
    for member in members:
      if not callable(getattr(member, "patch_grid", None)):
        raise TypeError(f"{type(member).__name__} is not a vision tower (it has no patch_grid)")
    if len(grid) != 2 or min(grid) < 1:
      raise ValueError(f"the common grid must be (rows, columns) >= 1, got {grid}")
    self.members = nnx.List(list(members))
    self.member_layers = tuple(int(layer) for layer in member_layers)
    self.boxes = tuple(tuple(int(v) for v in box) for box in boxes)
    self.grid = (int(grid[0]), int(grid[1]))

  @property
  def num_layers(self) -> int:
    return NUM_LAYERS

  def member_pixels(self, pixels: jax.Array) -> list[jax.Array]:
    """The canvas (batch, H, W, 3) cut into each member's own input."""
    height, width = pixels.shape[1:3]
    need_h = max(top + h for top, _, h, _ in self.boxes)
    need_w = max(left + w for _, left, _, w in self.boxes)
    if height < need_h or width < need_w:
      raise ValueError(f"a {height}x{width} input is smaller than the members' canvas "
                       f"({need_h}x{need_w}); preprocess images with the tower's own "
                       "MultiPreprocessing")
    return [pixels[:, top:top + h, left:left + w] for top, left, h, w in self.boxes]

  def member_grids(self, pixels: jax.Array) -> list[jax.Array]:
    """Each member's native (batch, rows, cols, dim) grid at its own layer."""
    return [member.patch_grid(x, layer) for member, layer, x
            in zip(self.members, self.member_layers, self.member_pixels(pixels))]

  def patch_grid(self, pixels: jax.Array, layer: int) -> jax.Array:
    """(batch, rows, cols, sum of the members' dims) float32 on the common grid.

    Raises:
      ValueError: a layer other than the tower's one (-1 or 0).
    """
    if layer not in (LAYER, LAYER + NUM_LAYERS):
      raise ValueError(f"a multi-encoder tower has one layer ({LAYER}): its members' layers are "
                       f"named in its spec (a@layer=-2+b@layer=-1); got layer {layer}")
    grids = [resample_grid(g, self.grid) for g in self.member_grids(pixels)]
    return jnp.concatenate(grids, axis=-1)
