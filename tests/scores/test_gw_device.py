"""The device-only GW path: the auction assignment oracle, and GW with ``oracle="device"``.

The auction (vlmsel_jax/scores/assignment.py) is checked against SciPy's exact assignment; the
GW solvers with the device oracle are checked with every host-callback entry point of jax made to
raise, against POT's CG objective, and batched / sharded against the one-by-one loop.
"""

import dataclasses
import re

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import ot
import pytest
import scipy.optimize

from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import assignment
from vlmsel_jax.scores import gw

DEVICE = gw.AnnealedOptions(oracle="device")

# ----------------------------------------------------------------------------------------------
# The auction against SciPy.


def _matrix(kind: str, n: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if kind == "random":
    return rng.random((n, n))
  if kind == "ties":  # Integer costs in {0, 1, 2}: many optimal permutations.
    return rng.integers(0, 3, (n, n)).astype(np.float64)
  if kind == "constant":  # Every permutation is optimal.
    return np.full((n, n), 0.7)
  if kind == "rank1":  # Near-ties everywhere (the CG gradient at the product coupling is one).
    return np.outer(rng.random(n), rng.random(n))
  if kind == "duplicate_rows":  # Identical rows: degenerate, many exact ties.
    return np.repeat(rng.random((1, n)), n, axis=0) + np.repeat(rng.random((n, 1)), n, axis=1)
  if kind == "wide":  # Entries over six orders of magnitude.
    return rng.random((n, n)) * 10.0 ** rng.integers(-3, 3, (n, n))
  raise ValueError(kind)


def _optimum(cost: np.ndarray) -> float:
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  return float(cost[rows, cols].sum())


def _check_optimal(cost: np.ndarray, out: assignment.Assignment, tol: float = assignment.TOL,
                   integer: bool = False):
  """A permutation whose cost is within the auction's bound n · tol · R of SciPy's optimum."""
  n = cost.shape[0]
  cols = np.asarray(out.cols)
  assert cols.dtype == np.int32 and sorted(cols.tolist()) == list(range(n)), cols
  assert bool(out.complete)
  got, want = assignment.permutation_cost(cost, cols), _optimum(cost)
  spread = float((cost - cost.min(axis=1, keepdims=True)).max())
  if integer:
    assert got == want, (got, want)
  # The bound, plus float32 round-off of the n summed entries.
  assert got <= want + n * tol * spread + 1e-6 * n * np.abs(cost).max(), (got, want)
  assert got >= want - 1e-9 * max(1.0, abs(want))


@pytest.mark.parametrize("kind", ["random", "ties", "constant", "rank1", "duplicate_rows", "wide"])
@pytest.mark.parametrize("n", [2, 7, 60, 150])
def test_auction_is_an_optimal_permutation(kind, n):
  cost = _matrix(kind, n, seed=n)
  out = jax.jit(assignment.auction)(jnp.asarray(cost, jnp.float32))
  # Optimality of the float32 matrix the auction saw.
  _check_optimal(np.asarray(jnp.asarray(cost, jnp.float32), np.float64), out,
                 integer=kind in ("ties", "constant"))


@pytest.mark.parametrize("kind", ["random", "ties", "rank1"])
def test_auction_in_float64_at_a_tighter_tolerance(kind):
  cost = _matrix(kind, 80, seed=5)
  with jax.enable_x64(True):
    out = assignment.auction(jnp.asarray(cost, jnp.float64), tol=1e-9)
    assert out.prices.dtype == jnp.float64
  _check_optimal(cost, out, tol=1e-9, integer=kind == "ties")


def test_auction_on_gw_gradients_matches_scipy():
  """The matrices the CG polish meets: GW gradients at an entropic coupling and at a permutation."""
  pool = synthetic.make_pool(n=200, seed=0)
  for index in (5, 11):
    cx, cy, _ = gw.prepare_costs(pool.candidates[index], pool.text)
    coupling = jax.jit(gw.coupling_stage, static_argnums=2)(cx, cy, gw.AnnealedOptions()).coupling
    perm = jnp.eye(200)[np.random.default_rng(index).permutation(200)] / 200
    for t in (coupling, perm):
      p = t.sum(axis=1)
      grad = 2 * ((cx * cx) @ p)[:, None] + 2 * ((cy * cy) @ p)[None, :] - 4 * cx @ t @ cy
      _check_optimal(np.asarray(grad, np.float64), assignment.auction(grad))


@jax.jit
def _polish(cx, cy, coupling, prices):
  coupling, _, _, rounds = gw.cg_polish(cx, cy, coupling, DEVICE, prices=prices)
  return gw.gw_objective(cx, cy, coupling), rounds


def _polish_rounds(cx, cy, stage, prices):
  value, rounds = _polish(cx, cy, stage.coupling, prices)
  return float(value), int(rounds)


def test_polish_starts_its_first_auction_from_the_entropic_stage_dual():
  """``CouplingStage.prices`` (minus twice ott's last column potential) start the first auction
  near the optimal dual: over the 12 synthetic candidates at n = 200 the polish needs far
  fewer bidding rounds in all than from the column reduction (measured 3,836 against 5,188;
  from the potentials unscaled, 4,711), at the same objectives."""
  stage_fn = jax.jit(gw.coupling_stage, static_argnums=2)
  totals = {"dual": 0, "cold": 0}
  pool = synthetic.make_pool(n=200, seed=0)
  for index in range(len(pool.candidates)):
    cx, cy, _ = gw.prepare_costs(pool.candidates[index], pool.text)
    stage = stage_fn(cx, cy, DEVICE)
    assert stage.prices.shape == (200,) and bool(jnp.all(jnp.isfinite(stage.prices)))
    dual_value, dual_rounds = _polish_rounds(cx, cy, stage, stage.prices)
    cold_value, cold_rounds = _polish_rounds(cx, cy, stage, None)
    totals["dual"] += dual_rounds
    totals["cold"] += cold_rounds
    assert dual_value == pytest.approx(cold_value, rel=2e-3), pool.names[index]
  assert totals["dual"] < 0.85 * totals["cold"], totals


def test_stages_without_a_dual_start_the_first_auction_cold(pool):
  """CG's product start has no dual (NaN prices): the polish is exactly the cold-started one."""
  cx, cy, _ = gw.prepare_costs(pool.candidates[5], pool.text)
  opts = gw.CGOptions(oracle="device")
  stage = jax.jit(gw.coupling_stage, static_argnums=2)(cx, cy, opts)
  assert bool(jnp.all(jnp.isnan(stage.prices)))
  polish = jax.jit(lambda u, v, t, pr: gw.cg_polish(u, v, t, opts, prices=pr))
  nan_start = polish(cx, cy, stage.coupling, stage.prices)
  cold = polish(cx, cy, stage.coupling, None)
  np.testing.assert_array_equal(np.asarray(nan_start[0]), np.asarray(cold[0]))
  assert int(nan_start[3]) == int(cold[3]) > 0


def test_auction_vmaps_and_warm_starts():
  costs = np.stack([_matrix("random", 50, seed=s) for s in range(4)]).astype(np.float32)
  batched = jax.jit(jax.vmap(assignment.auction))(jnp.asarray(costs))
  for i in range(4):
    one = assignment.auction(jnp.asarray(costs[i]))
    np.testing.assert_array_equal(np.asarray(batched.cols[i]), np.asarray(one.cols))
    _check_optimal(costs[i].astype(np.float64), jax.tree.map(lambda v, i=i: v[i], batched))
  # Warm start: the same matrix again from its own prices needs (almost) no bidding.
  cold = assignment.auction(jnp.asarray(costs[0]))
  warm = assignment.auction(jnp.asarray(costs[0]), prices=cold.prices, eps_start=assignment.TOL)
  _check_optimal(costs[0].astype(np.float64), warm)
  assert int(warm.rounds) <= 10 < 2 * 10 < int(cold.rounds)
  # Prices are per column: adding a constant to each row changes nothing.
  shifted = costs[0] + np.arange(50, dtype=np.float32)[:, None]
  again = assignment.auction(jnp.asarray(shifted), prices=cold.prices, eps_start=1e-3)
  _check_optimal(shifted.astype(np.float64), again)


def test_auction_cap_and_bad_input_still_give_permutations():
  cost = jnp.asarray(_matrix("random", 40), jnp.float32)
  capped = assignment.auction(cost, max_rounds=1)
  assert not bool(capped.complete)
  assert sorted(np.asarray(capped.cols).tolist()) == list(range(40))
  nan = assignment.auction(cost.at[3, 4].set(jnp.nan))
  assert not bool(nan.complete) and int(nan.rounds) == 0
  assert sorted(np.asarray(nan.cols).tolist()) == list(range(40))
  one = assignment.auction(jnp.ones((1, 1)))
  assert np.asarray(one.cols).tolist() == [0] and bool(one.complete)
  with pytest.raises(ValueError, match=r"square matrix, got shape \(3, 4\)"):
    assignment.auction(jnp.ones((3, 4)))
  np.testing.assert_array_equal(assignment.linear_assignment(cost),
                                scipy.optimize.linear_sum_assignment(np.asarray(cost))[1])


# ----------------------------------------------------------------------------------------------
# GW with the device oracle: no host callback anywhere.


@pytest.fixture(name="no_callbacks")
def _no_callbacks(monkeypatch):
  """Every way a jax program calls the host raises; the GW programs' caches are cleared, so
  each is traced again under the patch."""

  def refuse(*args, **kwargs):
    raise AssertionError("a host callback was traced into the device-only GW program")

  monkeypatch.setattr(jax, "pure_callback", refuse)
  monkeypatch.setattr(jax.experimental, "io_callback", refuse)
  monkeypatch.setattr(jax.debug, "callback", refuse)
  # pylint: disable=protected-access
  gw._solve_jit.clear_cache()
  gw._cg_stage_jit.clear_cache()
  gw._batched_solve.cache_clear()
  gw._sharded_programs.cache_clear()
  yield


def _custom_calls(text: str) -> set[str]:
  return set(re.findall(r"custom_call @([A-Za-z0-9_]+)", text)) | set(
      re.findall(r'custom_call_target\s*=\s*"([A-Za-z0-9_]+)"', text))


@pytest.mark.parametrize("options", [DEVICE, gw.EntropicOptions(oracle="device"),
                                     gw.CGOptions(oracle="device")])
def test_device_program_has_no_host_callback(options):
  with jax.enable_x64(options.dtype == np.float64):
    cx = jnp.asarray(np.random.default_rng(0).random((16, 16)), options.dtype)
    cx = cx + cx.T
    text = gw._solve_jit.lower(cx, cx, opts=options).as_text()  # pylint: disable=protected-access
    host = gw._solve_jit.lower(  # pylint: disable=protected-access
        cx, cx, opts=dataclasses.replace(options, oracle="host")).as_text()
  assert "callback" not in text, _custom_calls(text)
  assert any("callback" in c for c in _custom_calls(host))  # The check can see one.


def _pot_cg(x, y):
  """POT's CG GW on the float64 cost matrices of (x, y), in original units."""
  with jax.enable_x64(True):
    cx, cy, unit = gw.prepare_costs(np.asarray(x, np.float64), np.asarray(y, np.float64))
  p = np.full(cx.shape[0], 1.0 / cx.shape[0])
  value = ot.gromov.gromov_wasserstein2(np.asarray(cx), np.asarray(cy), p, p, "square_loss",
                                        max_iter=1000)
  return value * float(unit) ** 2


@pytest.mark.parametrize("n, index", [(250, 5), (250, 11), (500, 5), (500, 2)])
def test_device_solver_reaches_pot_cg(no_callbacks, n, index):
  """Candidates 5 ("warp_1.5_noise_0.3", the benchmark's), 11 ("random"), 2 ("warp_0.5")."""
  pool = synthetic.make_pool(n=n, seed=0)
  x, y = pool.candidates[index], pool.text
  got = gw.gw_distance(x, y, options=DEVICE)
  want = _pot_cg(x, y)
  assert got.converged and got.solver == "annealed"
  assert got.value <= want * 1.005, (got.value, want, got.value / want)


@pytest.fixture(scope="module", name="pool")
def _pool():
  return synthetic.make_pool(n=120, seed=3)


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_batched_device_solve_equals_loop(no_callbacks, monkeypatch, pool, mode):
  """One shard_map program over 8 devices, CG included: no per-candidate CG programs."""
  assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (tests/conftest.py)"
  cands = pool.candidates[:3]  # 3 candidates over 8 devices: exercises the padding.
  looped = np.array([gw.gw_distance(c, pool.text, options=DEVICE).value for c in cands])

  def refuse(*args, **kwargs):
    raise AssertionError("per-candidate CG program called")

  monkeypatch.setattr(gw, "_cg_stage_jit", refuse)
  results = gw.gw_distances(cands, pool.text, options=DEVICE, batch_mode=mode)
  np.testing.assert_allclose([r.value for r in results], looped, rtol=1e-5)
  assert all(r.converged for r in results)
  if mode == "vmap":  # Several candidates in one vmapped solve on one device.
    single = gw.gw_distances(cands, pool.text, options=DEVICE, batch_mode=mode,
                             devices=jax.devices()[:1])
    np.testing.assert_allclose([r.value for r in single], looped, rtol=1e-5)


def test_batched_device_solve_is_sharded_over_the_candidate_mesh(pool):
  mesh = gw.parallel.candidate_mesh()
  cx, cy, _ = gw.prepare_costs(pool.candidates[0], pool.text)
  stacked = jax.device_put(jnp.stack([cx] * 8), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("candidates")))
  values, _, _ = gw._batched_solve(DEVICE, mesh, "vmap")(stacked, cy)  # pylint: disable=protected-access
  assert values.sharding.spec == jax.sharding.PartitionSpec("candidates")
  assert {s.device for s in values.addressable_shards} == set(jax.devices())
  np.testing.assert_allclose(np.asarray(values), float(values[0]), rtol=1e-6)


def test_one_problem_sharded_over_devices_with_the_device_oracle(no_callbacks, pool):
  """Rows of one 120 × 120 problem over 8 devices, CG steps partitioned too (no gather)."""
  x, y = pool.candidates[5], pool.text
  want = gw.gw_distance(x, y, options=DEVICE)
  got = gw.gw_distance(x, y, options=DEVICE, devices=jax.devices())
  assert (got.iterations, got.converged) == (want.iterations, want.converged)
  # The objective is a difference of O(1) terms (pᵀcx²p + qᵀcy²q − 2⟨cx π cy, π⟩); partitioned
  # sums change the last float32 bits of those terms, so the bound is relative to them.
  cx, cy, unit = gw.prepare_costs(x, y)
  terms = float(jnp.mean(cx * cx) + jnp.mean(cy * cy)) * float(unit) ** 2
  assert abs(got.value - want.value) <= 1e-6 * terms, (got.value, want.value)


def test_other_solvers_with_the_device_oracle(no_callbacks, pool):
  x, y = pool.candidates[4], pool.text
  for options in (gw.EntropicOptions(epsilon=5e-3, oracle="device"),
                  gw.CGOptions(oracle="device"), gw.CGOptions(oracle="device", precision="float32")):
    res = gw.gw_distance(x, y, options=options)
    assert np.isfinite(res.value) and res.converged, (options, res)
  # The polish never makes the entropic coupling worse.
  raw = gw.gw_distance(x, y, options=gw.EntropicOptions(epsilon=5e-3, polish=False)).value
  polished = gw.gw_distance(x, y, options=gw.EntropicOptions(epsilon=5e-3, oracle="device"))
  assert polished.value <= raw * (1 + 1e-6)


def test_device_and_host_oracles_agree_on_the_default_solver(pool):
  for x in pool.candidates[::3]:
    host = gw.gw_distance(x, pool.text, options=gw.AnnealedOptions(oracle="host")).value
    device = gw.gw_distance(x, pool.text, options=DEVICE).value
    assert device <= host * 1.005 and host <= device * 1.005, (host, device)


# ----------------------------------------------------------------------------------------------
# The oracle option.


def test_oracle_option_resolution_and_validation():
  for cls in (gw.AnnealedOptions, gw.EntropicOptions, gw.CGOptions):
    assert cls().oracle == "auto"
    assert cls().cg_oracle("cpu") == "host"
    assert cls().cg_oracle("gpu") == cls().cg_oracle("tpu") == "device"
    assert cls(oracle="host").cg_oracle("gpu") == "host"
    assert cls(oracle="device").cg_oracle("cpu") == "device"
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.oracle must be one of auto, host, "
                                         r"device, got 'gpu'$"):
      cls(oracle="gpu")
  assert not hasattr(gw.LowRankOptions(), "oracle")
  resolve = gw._resolve_oracle  # pylint: disable=protected-access
  assert resolve(gw.AnnealedOptions(), "cpu") == gw.AnnealedOptions(oracle="host")
  assert resolve(gw.AnnealedOptions(), "gpu") == DEVICE
  assert resolve(gw.LowRankOptions(), "gpu") == gw.LowRankOptions()


def test_oracle_flag_maps_to_the_records():
  assert "gw_oracle" in gw.FLAGS
  assert gw.options_from_flags("annealed", gw_oracle="device") == DEVICE
  assert gw.options_from_flags("entropic", gw_oracle="host") == gw.EntropicOptions(oracle="host")
  assert gw.options_from_flags("cg", gw_oracle="device") == gw.CGOptions(oracle="device")
  assert gw.options_from_flags("lowrank", gw_oracle="device") == gw.LowRankOptions()
  assert gw.options_from_flags("annealed", gw_oracle=None) == gw.AnnealedOptions()
  with pytest.raises(ValueError, match=r"^--gw_oracle: AnnealedOptions\.oracle must be one of"):
    gw.options_from_flags("annealed", gw_oracle="tpu")


def test_auto_oracle_uses_the_host_on_cpu(monkeypatch, pool):
  """On CPU the network simplex is faster at the same objective, so "auto" keeps it."""
  calls = []
  host = gw._assignment_host  # pylint: disable=protected-access

  def counting(cost):
    calls.append(cost.shape)
    return host(cost)

  monkeypatch.setattr(gw, "_assignment_host", counting)
  jax.clear_caches()
  gw.gw_distance(pool.candidates[1], pool.text)
  assert calls and calls[0] == (120, 120)
