"""Small array helpers every score shares.

Matrix products run at HIGHEST precision: the default on TPU (and on GPUs with TF32) multiplies
in reduced precision, which moves CKA/CCA values in the third digit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
TINY_NORM = 1e-12


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """Matrix product at full float32 precision."""
  return jnp.matmul(a, b, precision=HIGHEST)


def center(x: jax.Array) -> jax.Array:
  """Features with their per-column mean removed."""
  return x - jnp.mean(x, axis=0, keepdims=True)


def unit_rows(x: jax.Array) -> jax.Array:
  """Rows scaled to unit Euclidean norm (all-zero rows stay zero)."""
  norms = jnp.linalg.norm(x, axis=1, keepdims=True)
  return x / jnp.maximum(norms, TINY_NORM)
