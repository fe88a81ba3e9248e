"""Small array helpers every score shares.

Matrix products run at HIGHEST precision: the default on TPU (and on GPUs with TF32) multiplies
in reduced precision, which moves CKA/CCA values in the third digit.

``median`` finds order statistics by bisection on the float bit pattern instead of sorting: the
median of an n x n distance matrix is 33 counting passes, where ``jnp.median`` sorts all n^2
entries (the slowest part of RBF CKA on XLA:CPU, slower than NumPy's selection:
benchmarks/README.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
TINY_NORM = 1e-12
_SIGN = np.uint32(0x80000000)
_ALL_ONES = np.uint32(0xFFFFFFFF)


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


def _sortable_key(x: jax.Array) -> jax.Array:
  """float32 → uint32 with the same order (negative floats reversed below the positive ones)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where((bits & _SIGN) != 0, ~bits, bits | _SIGN)


def _float_of_key(key: jax.Array) -> jax.Array:
  bits = jnp.where((key & _SIGN) != 0, key & ~_SIGN, ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _kth_key(keys: jax.Array, mask: jax.Array, k: jax.Array) -> jax.Array:
  """The (k+1)-th smallest of ``keys[mask]``: the least t with #{keys ≤ t} ≥ k + 1."""

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum((keys <= mid) & mask, dtype=jnp.int32) >= k + 1
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  # 32 halvings of the uint32 range leave one key.
  lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(_ALL_ONES)))
  return lo


def median(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Exact median of the float32 entries of ``x`` (where ``mask``), as ``np.median`` defines it.

  With an even count it is the mean of the two middle values. No sort: the lower middle value is
  found by bisection over the 2^32 float bit patterns (32 counting passes over ``x``), the upper
  one is either the same value or the least entry above it (one more pass). NaNs are not
  supported (callers validate their inputs first); an empty selection gives NaN.
  """
  keys = _sortable_key(x)
  mask = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
  count = jnp.sum(mask, dtype=jnp.int32)
  lower_key = _kth_key(keys, mask, (count - 1) // 2)
  at_most_lower = jnp.sum((keys <= lower_key) & mask, dtype=jnp.int32)
  above = jnp.min(jnp.where(mask & (keys > lower_key), keys, _ALL_ONES))
  upper_key = jnp.where(at_most_lower >= count // 2 + 1, lower_key, above)
  lower, upper = _float_of_key(lower_key), _float_of_key(upper_key)
  value = jnp.where(count % 2 == 1, lower, 0.5 * (lower + upper))
  return jnp.where(count > 0, value, jnp.nan)
