"""The shared array helpers: the sort-free median against NumPy's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmsel_jax.scores import linalg

median = jax.jit(linalg.median)


@pytest.mark.parametrize("size", [1, 2, 3, 10, 11, 1000, 1001])
def test_median_equals_numpy_on_random_values(size):
  x = np.random.default_rng(size).normal(size=size).astype(np.float32) * 1e3
  assert float(median(x)) == pytest.approx(float(np.median(x)), rel=1e-7, abs=0)


def test_median_with_ties_signs_zeros_and_extremes():
  cases = [
      [3.0, 3.0, 3.0, 3.0],
      [0.0, 0.0, 0.0, 5.0],
      [-0.0, 0.0, -1.0, 1.0],
      [-5.0, -2.0, -7.0, -1.0, -3.0],
      [1e-30, 3e-37, 0.0, 7e-37],  # tiny (XLA:CPU flushes subnormals, so none here)
      [np.finfo(np.float32).max, -np.finfo(np.float32).max, 1.0],
      [np.inf, -np.inf, 2.0, 4.0, 6.0],
      [1.0, 2.0, 2.0, 2.0, 9.0, 9.0],
  ]
  for values in cases:
    x = np.asarray(values, np.float32)
    assert float(median(x)) == float(np.median(x)), values


def test_median_over_a_mask_is_the_median_of_the_selected_entries():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 20, size=(37, 37)).astype(np.float32)  # many ties
  mask = rng.random((37, 37)) < 0.3
  assert float(median(x, mask)) == float(np.median(x[mask]))
  off_diagonal = ~np.eye(37, dtype=bool)
  assert float(median(x, off_diagonal)) == float(np.median(x[off_diagonal]))


def test_median_of_nothing_is_nan():
  assert np.isnan(float(median(jnp.ones(4), jnp.zeros(4, bool))))
