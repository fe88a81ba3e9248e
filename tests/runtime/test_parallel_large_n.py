"""Large n: factored low-rank GW (no n×n matrix, rows sharded) and streaming minibatch CKA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import checks
from vlmsel_jax.scores import cka
from vlmsel_jax.scores import distances
from vlmsel_jax.scores import gw


@pytest.fixture(scope="module", name="pool")
def _pool():
  return synthetic.make_pool(n=120, seed=0)


def test_factored_lowrank_equals_lowrank_on_dense_cosine_costs(pool):
  x, y = pool.candidates[5], pool.text
  dense = gw.gw_distance(x, y, distance="cosine", options=gw.LowRankOptions(rank=8))
  got = gw.lowrank_gw_large(x, y, options=gw.LowRankOptions(rank=8))  # 120 rows over 8 devices.
  # Same problem, same initialization, same iterations; only float32 summation order differs.
  np.testing.assert_allclose(got.value, dense.value, rtol=1e-4)
  assert got.iterations == dense.iterations and got.converged == dense.converged


@pytest.mark.parametrize("options", [gw.AnnealedOptions(),
                                     gw.EntropicOptions(polish=False, gw_iterations=5)])
def test_one_problem_sharded_over_devices_equals_one_device(pool, options):
  x, y = pool.candidates[5], pool.text
  want = gw.gw_distance(x, y, options=options)
  got = gw.gw_distance(x, y, options=options, devices=jax.devices())  # Rows of 120 × 120 over 8.
  # The partitioned products add in another order: float32 round-off only. The default solver
  # agrees to 1e-5; the unpolished entropic solver carries the round-off through exp(-cost / ε)
  # of every outer iteration, and ends 1.5e-5 apart on an AMD EPYC (within 1e-5 on the CPUs
  # earlier runs had), so it gets 5e-5.
  rtol = 5e-5 if options.solver == "entropic" else 1e-5
  np.testing.assert_allclose(got.value, want.value, rtol=rtol)
  assert (got.iterations, got.converged) == (want.iterations, want.converged)


def test_sharded_problem_needs_rows_divisible_by_devices(pool):
  with pytest.raises(ValueError, match=r"needs n divisible by the 8 devices, got n = 117"):
    gw.gw_distance(pool.candidates[0][:117], pool.text[:117], devices=jax.devices())


def test_factored_objective_equals_the_dense_objective():
  rng = np.random.default_rng(0)
  n, r = 30, 4
  x, y = rng.standard_normal((n, 5)), rng.standard_normal((n, 7))
  a, b = gw._cosine_factors(jnp.asarray(x, jnp.float32), 0.7)  # pylint: disable=protected-access
  c, e = gw._cosine_factors(jnp.asarray(y, jnp.float32), 1.3)  # pylint: disable=protected-access
  q = jnp.asarray(rng.random((n, r)), jnp.float32)
  rr = jnp.asarray(rng.random((n, r)), jnp.float32)
  g = q.sum(axis=0)
  coupling = (q / g) @ rr.T
  want = gw.gw_objective(a @ b.T, c @ e.T, coupling)
  got = gw._factored_objective(a, b, c, e, q, rr, g)  # pylint: disable=protected-access
  np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
  # The factors are the scaled cosine distance matrix.
  np.testing.assert_allclose(np.asarray(a @ b.T), np.asarray(distances.pairwise_distances(
      jnp.asarray(x, jnp.float32), "cosine")) / 0.7, atol=2e-6)


def test_median_is_exact_for_small_n_and_a_tight_quantile_when_sampled():
  x = np.random.default_rng(1).standard_normal((2000, 16)).astype(np.float32)
  all_d = np.asarray(distances.pairwise_distances(x[:300], "cosine"))
  exact = float(distances.median_off_diagonal(all_d))
  np.testing.assert_allclose(gw.sampled_median_distance(x[:300], pairs=10**6), exact, rtol=1e-6)
  med = gw.sampled_median_distance(x, pairs=100_000, seed=3)
  d = np.asarray(distances.pairwise_distances(x, "cosine"))[np.triu_indices(2000, k=1)]
  # 100k sampled pairs: the quantile's standard error is 0.5/sqrt(1e5) = 0.0016.
  assert abs(np.mean(d < med) - 0.5) < 0.005


def test_large_n_rejects_distances_that_are_not_low_rank(pool):
  with pytest.raises(ValueError, match=r"large-n GW supports distance cosine, got 'angular'"):
    gw.lowrank_gw_large(pool.candidates[0], pool.text, distance="angular")
  with pytest.raises(checks.FeatureError, match=r"x: the median pairwise distance is zero"):
    x = np.zeros((20, 3))
    x[:, 0] = 1.0  # Unit rows: cosine distance exactly 0 between them.
    x[:5] = np.random.default_rng(0).standard_normal((5, 3))  # 105 of 190 pairs at distance 0.
    gw.lowrank_gw_large(x, np.random.default_rng(1).standard_normal((20, 4)),
                        options=gw.LowRankOptions(rank=2))


def _batches(x, y, m):
  for s in range(0, x.shape[0], m):
    yield x[s:s + m], y[s:s + m]


def test_streaming_cka_equals_minibatch_cka_on_the_same_batches():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1030, 12)).astype(np.float32)
  y = (x @ rng.standard_normal((12, 9)) + rng.standard_normal((1030, 9))).astype(np.float32)
  order = np.random.default_rng(7).permutation(1030)
  want = cka.minibatch_cka(x, y, batch_size=100, seed=7)  # 10 batches of 100 + one of 30.
  for chunk in (1, 3, 64):
    got = cka.streaming_minibatch_cka(_batches(x[order], y[order], 100), chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_streaming_cka_converges_to_the_population_value():
  # x ~ N(0, I), y = x W + ε: population linear CKA = ||W||² / (||I|| ||WᵀW + I||) (Frobenius).
  dx, dy, m, batches = 8, 6, 256, 100
  w = np.random.default_rng(0).standard_normal((dx, dy))
  population = np.linalg.norm(w) ** 2 / (np.sqrt(dx) * np.linalg.norm(w.T @ w + np.eye(dy)))
  rng = np.random.default_rng(1)

  def stream():
    for _ in range(batches):
      x = rng.standard_normal((m, dx))
      yield x.astype(np.float32), (x @ w + rng.standard_normal((m, dy))).astype(np.float32)

  # 25,600 samples: the estimator's spread over seeds is 0.0015 (measured, 8 seeds).
  np.testing.assert_allclose(cka.streaming_minibatch_cka(stream()), population, atol=0.006)


def test_streaming_cka_errors():
  with pytest.raises(ValueError, match="the batch stream is empty"):
    cka.streaming_minibatch_cka(iter([]))
  with pytest.raises(checks.FeatureError, match="x batch 1"):
    cka.streaming_minibatch_cka([(np.eye(5), np.eye(5)), (np.full((5, 2), np.nan), np.eye(5))])
