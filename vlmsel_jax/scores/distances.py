"""Intra-space pairwise distances and the median-ratio scale alignment (METHODS §1).

GW compares two spaces only through their n×n distance matrices, so these matrices are the
whole interface between features and the GW solvers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlmsel_jax.scores import linalg

DISTANCES = ("angular", "cosine", "euclidean")
SCALES = ("median", "max", "none")


def _cosine_similarity(x: jax.Array) -> jax.Array:
  # Rows with zero norm would divide by zero; unit_rows keeps them at similarity 0.
  xn = linalg.unit_rows(x)
  return linalg.mm(xn, xn.T)


@functools.partial(jax.jit, static_argnames=("distance",))
def pairwise_distances(x: jax.Array, distance: str = "angular") -> jax.Array:
  """The n×n distance matrix of the rows of ``x`` with a zero diagonal.

  Args:
    x: (n, d) features.
    distance: "angular" = arccos(clip(cos, -1, 1)) in [0, π]; "cosine" = 1 − cos in [0, 2];
      "euclidean" = ‖x_i − x_j‖₂.
  """
  x = jnp.asarray(x)
  # float64 input stays float64 (the CG reference path runs in double precision under x64).
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  n = x.shape[0]
  if distance == "angular":
    d = jnp.arccos(jnp.clip(_cosine_similarity(x), -1.0, 1.0))
  elif distance == "cosine":
    d = jnp.clip(1.0 - _cosine_similarity(x), 0.0, 2.0)
  elif distance == "euclidean":
    # Distances are translation invariant. Shifting by one sample keeps the norm expansion from
    # cancelling when the features share a large offset, like centering would, but is exact for
    # integer-valued features, so their tied distances stay tied (a float32 mean would not).
    xs = x - x[:1]
    sq = jnp.sum(xs * xs, axis=1)
    d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * linalg.mm(xs, xs.T), 0.0))
  else:
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
  # Exact zeros on the diagonal: arccos(1 - ulp) would otherwise leave ~3e-4 there.
  return jnp.where(jnp.eye(n, dtype=bool), 0.0, d)


@jax.jit
def median_off_diagonal(d: jax.Array) -> jax.Array:
  """Median of the strictly upper-triangular entries (the distinct pairs) of a symmetric matrix.

  Selected by a mask, without gathering the triangle or sorting it.
  """
  n = d.shape[0]
  upper = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]
  return linalg.median(d, upper)


@functools.partial(jax.jit, static_argnames=("scale",))
def align_scale(dx: jax.Array, dy: jax.Array, scale: str = "median"):
  """Rescales ``dx`` to ``dy``'s scale: returns (s · dx, dy, s).

  "median" (METHODS §1): s = median(D^Y) / median(D^X) over off-diagonal entries.
  "max": both matrices divided by their own maximum (s applies to dx; dy is also scaled).
  "none": unchanged.
  """
  if scale == "median":
    s = median_off_diagonal(dy) / median_off_diagonal(dx)
    return dx * s, dy, s
  if scale == "max":
    s = 1.0 / jnp.max(dx)
    return dx * s, dy / jnp.max(dy), s
  if scale == "none":
    return dx, dy, jnp.ones((), dx.dtype)
  raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
