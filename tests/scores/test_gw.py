"""GW distance: the objective, each solver against POT, batching and sharding, bad input."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import checks
from vlmsel_jax.scores import gw


@pytest.fixture(scope="module", name="pool")
def _pool():
  return synthetic.make_pool(n=120, seed=3)


def _costs64(x, y):
  """The cost matrices the solvers see, computed in float64 (as the ``cg`` path does)."""
  with jax.enable_x64(True):
    cx, cy, unit = gw.prepare_costs(np.asarray(x, np.float64), np.asarray(y, np.float64))
    return np.asarray(cx), np.asarray(cy), float(unit)


def _pot_cg(cx, cy):
  n = cx.shape[0]
  p = np.full(n, 1.0 / n)
  return ot.gromov.gromov_wasserstein2(np.asarray(cx, np.float64), np.asarray(cy, np.float64),
                                       p, p, "square_loss", max_iter=1000)


def test_objective_matches_brute_force_sum():
  rng = np.random.default_rng(0)
  n = 5
  cx = rng.random((n, n)); cx = cx + cx.T
  cy = rng.random((n, n)); cy = cy + cy.T
  t = rng.random((n, n)); t /= t.sum()
  want = sum((cx[i, k] - cy[j, l]) ** 2 * t[i, j] * t[k, l]
             for i, j, k, l in itertools.product(range(n), repeat=4))
  got = float(gw.gw_objective(jnp.asarray(cx), jnp.asarray(cy), jnp.asarray(t)))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_objective_matches_pot_loss(pool):
  cx, cy, _ = gw.prepare_costs(pool.candidates[2], pool.text)
  n = cx.shape[0]
  t = np.random.default_rng(1).random((n, n)); t /= t.sum()
  c1, c2 = np.asarray(cx, np.float64), np.asarray(cy, np.float64)
  const_c, h1, h2 = ot.gromov.init_matrix(c1, c2, t.sum(1), t.sum(0), "square_loss")
  want = ot.gromov.gwloss(const_c, h1, h2, t)
  np.testing.assert_allclose(float(gw.gw_objective(cx, cy, jnp.asarray(t, jnp.float32))), want,
                             rtol=1e-4)


def test_isometric_candidate_has_near_zero_gw():
  # y is x rotated: the identity coupling has GW exactly 0; the solver must find (near) it.
  rng = np.random.default_rng(0)
  x = synthetic.make_pool(n=100, seed=1).candidates[0]
  q, _ = np.linalg.qr(rng.standard_normal((x.shape[1], x.shape[1])))
  res = gw.gw_distance(x, (x @ q).astype(np.float32))
  assert res.value < 1e-5, res


@pytest.mark.parametrize("index", [0, 4, 8, 10])
def test_cg_solver_reaches_pot_cg(pool, index):
  """Our CG (Frank-Wolfe + exact line search) is within 0.5% of POT's CG, or below it.

  Both start from the product coupling and take the same oracle answers in float64.
  """
  cx, cy, unit = _costs64(pool.candidates[index], pool.text)
  want = _pot_cg(cx, cy) * unit ** 2
  got = gw.gw_distance(pool.candidates[index], pool.text, options=gw.CGOptions())
  assert got.converged
  assert got.value <= want * 1.005, (got.value, want)


def test_cg_solver_follows_pot_on_the_whole_pool(pool):
  ratios = []
  for x in pool.candidates:
    cx, cy, unit = _costs64(x, pool.text)
    ratios.append(gw.gw_distance(x, pool.text, options=gw.CGOptions()).value /
                  (_pot_cg(cx, cy) * unit ** 2))
  np.testing.assert_allclose(ratios, 1.0, rtol=1e-6)


def test_cg_in_float32_is_allowed_but_not_the_reference(pool):
  res = gw.gw_distance(pool.candidates[0], pool.text, options=gw.CGOptions(precision="float32"))
  assert np.isfinite(res.value) and res.converged


@pytest.mark.parametrize("index", [0, 3, 6, 9, 11])
def test_default_solver_is_at_least_as_good_as_pot_cg(pool, index):
  cx, cy, unit = gw.prepare_costs(pool.candidates[index], pool.text)
  want = _pot_cg(cx, cy) * float(unit) ** 2
  got = gw.gw_distance(pool.candidates[index], pool.text)
  assert got.solver == "annealed"
  assert got.value <= want * 1.005, (got.value, want)


def test_rounding_gives_exact_uniform_marginals():
  """Altschuler et al.'s rounding: exact marginals, non-negative, a coupling left unchanged."""
  rng = np.random.default_rng(0)
  t = jnp.asarray(rng.random((7, 5)) / 35 * rng.uniform(0.8, 1.2, (7, 1)))
  with jax.enable_x64(True):
    r = np.asarray(gw.round_to_marginals(jnp.asarray(t, jnp.float64)))
    np.testing.assert_allclose(r.sum(1), 1 / 7, rtol=1e-12)
    np.testing.assert_allclose(r.sum(0), 1 / 5, rtol=1e-12)
    assert r.min() >= 0
    perm = np.eye(6)[rng.permutation(6)] / 6
    np.testing.assert_allclose(np.asarray(gw.round_to_marginals(jnp.asarray(perm))), perm,
                               atol=1e-15)


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_assignment_oracle_is_an_optimal_permutation(kind):
  """The network-simplex oracle returns a permutation as cheap as SciPy's exact assignment."""
  import scipy.optimize
  rng = np.random.default_rng(1)
  cost = rng.random((60, 60)) if kind == "random" else rng.integers(0, 3, (60, 60)) * 1.0
  cols = gw._assignment_host(cost)
  assert sorted(cols.tolist()) == list(range(60))
  rows, want = scipy.optimize.linear_sum_assignment(cost)
  assert cost[np.arange(60), cols].sum() == pytest.approx(cost[rows, want].sum(), abs=1e-9)


def test_assignment_oracle_falls_back_when_the_simplex_gives_no_permutation(monkeypatch):
  cost = np.random.default_rng(2).random((20, 20))
  monkeypatch.setattr(ot, "emd", lambda a, b, m, **k: (np.full(m.shape, 1 / 400),
                                                           {"result_code": 1}))
  import scipy.optimize
  np.testing.assert_array_equal(gw._assignment_host(cost),
                                scipy.optimize.linear_sum_assignment(cost)[1])


def test_reported_value_is_unregularized_objective(pool):
  """The entropic solver reports the primal GW of its coupling, in the text space's units."""
  x, y = pool.candidates[1], pool.text
  res = gw.gw_distance(x, y, options=gw.EntropicOptions(epsilon=5e-3, polish=False))
  cx, cy, unit = gw.prepare_costs(x, y)
  from ott.solvers.linear import sinkhorn
  from ott.solvers.quadratic import gromov_wasserstein as ott_gw
  out = ott_gw.GromovWasserstein(sinkhorn.Sinkhorn(max_iterations=1000), epsilon=5e-3,
                                 max_iterations=50, warm_start=True)(gw._problem(cx, cy))
  want = float(out.primal_cost) * float(unit) ** 2
  np.testing.assert_allclose(res.value, want, rtol=1e-4)


def test_polish_never_increases_the_objective(pool):
  x, y = pool.candidates[5], pool.text
  raw = gw.gw_distance(x, y, options=gw.EntropicOptions(epsilon=5e-3, polish=False)).value
  polished = gw.gw_distance(x, y, options=gw.EntropicOptions(epsilon=5e-3, polish=True)).value
  assert polished <= raw * (1 + 1e-6)


def test_gw_ranks_the_synthetic_pool(pool):
  """Graded damage: the undamaged candidate is closest, the random one farthest."""
  values = [r.value for r in gw.gw_distances(pool.candidates, pool.text)]
  assert int(np.argmin(values)) == 0
  assert int(np.argmax(values)) == len(values) - 1


def test_lowrank_runs_and_beats_the_product_coupling(pool):
  x, y = pool.candidates[0], pool.text
  cx, cy, unit = gw.prepare_costs(x, y)
  n = cx.shape[0]
  product = float(gw.gw_objective(cx, cy, jnp.full((n, n), 1.0 / n ** 2))) * float(unit) ** 2
  good = gw.gw_distance(x, y, options=gw.LowRankOptions(rank=10)).value
  bad = gw.gw_distance(pool.candidates[-1], y, options=gw.LowRankOptions(rank=10)).value
  dense = gw.gw_distance(x, y).value
  assert dense <= good < 0.9 * product
  assert good < bad


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_batched_equals_loop_and_single_device(pool, mode):
  assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (tests/conftest.py)"
  cands = pool.candidates[:5]  # 5 candidates over 8 devices: exercises the padding.
  looped = np.array([gw.gw_distance(c, pool.text).value for c in cands])
  sharded = np.array([r.value for r in gw.gw_distances(cands, pool.text, batch_mode=mode)])
  single = np.array([r.value for r in gw.gw_distances(cands, pool.text, batch_mode=mode,
                                                      devices=jax.devices()[:1])])
  np.testing.assert_allclose(sharded, looped, rtol=1e-5)
  np.testing.assert_allclose(single, looped, rtol=1e-5)


def test_batched_coupling_stage_is_a_vmap_sharded_over_the_candidate_mesh(pool):
  """The vmapped program really splits the candidate axis over all 8 devices."""
  mesh = gw.parallel.candidate_mesh()
  fn = gw._batched_coupling_stage(gw.AnnealedOptions(), mesh, "vmap")
  cx, cy, _ = gw.prepare_costs(pool.candidates[0], pool.text)
  stacked = jax.device_put(jnp.stack([cx] * 8), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("candidates")))
  couplings = fn(stacked, cy).coupling
  assert couplings.sharding.spec == jax.sharding.PartitionSpec("candidates")
  assert len(couplings.addressable_shards) == 8
  assert {s.device for s in couplings.addressable_shards} == set(jax.devices())
  c = np.asarray(couplings)
  np.testing.assert_allclose(c, np.broadcast_to(c[:1], c.shape), atol=1e-7)
  with pytest.raises(ValueError, match="unknown batch mode 'pmap'"):
    gw.gw_distances(pool.candidates[:2], pool.text, batch_mode="pmap")


_TWO_DEVICE_SCRIPT = """
import numpy as np
from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import gw
pool = synthetic.make_pool(n=200, seed=0)
for mode in ("map", "vmap"):
  res = gw.gw_distances(pool.candidates[:4], pool.text, batch_mode=mode)
  assert all(np.isfinite(r.value) for r in res), res
print("ok")
"""


def test_batched_gw_with_cg_steps_does_not_hang_on_two_devices():
  """Regression: host callbacks inside a 2-device program hung XLA:CPU at n >= ~150."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_explicit_cost_geometry_regression():
  """Regression: PointCloud(scale_cost='max_cost') fails on current jax; we must build explicit
  cost-matrix geometries whose costs are exactly ours (no hidden rescaling)."""
  from ott.geometry import geometry
  cx = jnp.asarray(np.random.default_rng(0).random((6, 6)), jnp.float32)
  cx = cx + cx.T
  prob = gw._problem(cx, 2 * cx)
  assert type(prob.geom_xx) is geometry.Geometry
  np.testing.assert_array_equal(np.asarray(prob.geom_xx.cost_matrix), np.asarray(cx))
  np.testing.assert_array_equal(np.asarray(prob.geom_yy.cost_matrix), np.asarray(2 * cx))
  res = jax.jit(lambda a, b: gw.solve_normalized(a, b, gw.AnnealedOptions()))(cx, cx)
  assert np.isfinite(float(res[0]))


@pytest.mark.parametrize("x, y, match", [
    (np.full((10, 3), np.nan), np.ones((10, 3)), "x: NaN values"),
    (np.random.rand(10, 3), np.random.rand(9, 3), "x has 10 samples but y has 9"),
    (np.random.rand(3, 3), np.random.rand(3, 3), "at least 4 samples"),
    (np.random.rand(10), np.random.rand(10, 3), "expected a 2-D array"),
    (np.ones((10, 3)), np.random.rand(10, 3), "all 10 samples are identical"),
])
def test_bad_features_raise_clear_errors(x, y, match):
  with pytest.raises(checks.FeatureError, match=match):
    gw.gw_distance(x, y)


def test_bad_solver_arguments_raise():
  x = np.random.rand(10, 3)
  with pytest.raises(ValueError, match="unknown GW solver 'sinkhorn'"):
    gw.gw_distance(x, x, options=gw.options_from_flags("sinkhorn"))
  with pytest.raises(ValueError, match="unknown GW solver option"):
    gw.gw_distance(x, x, options=gw.options_from_flags("annealed", max_iter=3))
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    gw.gw_distance(x, x, options=gw.EntropicOptions(epsilon=0.0))
  with pytest.raises(ValueError, match="candidate list is empty"):
    gw.gw_distances([], x)


# ----------------------------------------------------------------------------------------------
# Options in, records out.


@pytest.fixture(scope="module", name="small")
def _small():
  pool = synthetic.make_pool(n=60, seed=1)
  return pool.candidates[3], pool.text


# Each solver's record, the same settings as string-keyed flag values, and the value the
# kwargs API (before the options records) returned on the small problem.
_RECORD_VS_FLAGS = {
    "annealed": (gw.AnnealedOptions(epsilons=(2e-2, 4e-3), stage_iterations=4, gw_iterations=20,
                                    sinkhorn_iterations=7, cg_iterations=300),
                 {"gw_anneal_epsilons": ["2e-2", "4e-3"], "gw_anneal_iterations": 4,
                  "gw_iterations": 20, "gw_anneal_sinkhorn_iterations": 7,
                  "gw_cg_iterations": 300},
                 0.06806416800027275),
    "entropic": (gw.EntropicOptions(epsilon=5e-3, polish=False, sinkhorn_iterations=200,
                                    gw_iterations=30),
                 {"gw_epsilon": 5e-3, "gw_polish": False, "gw_sinkhorn_iterations": 200,
                  "gw_iterations": 30},
                 0.028225057473293166),
    "cg": (gw.CGOptions(), {}, 0.06368825349283913),
    "lowrank": (gw.LowRankOptions(rank=6, iterations=100, gamma=50.0, epsilon=2e-3),
                {"gw_rank": 6, "gw_lowrank_iterations": 100, "gw_lowrank_gamma": 50.0,
                 "gw_epsilon": 2e-3},
                0.18106346147515798),
}


@pytest.mark.parametrize("solver", sorted(_RECORD_VS_FLAGS))
def test_record_equals_the_string_keyed_path(small, solver):
  record, flag_values, before = _RECORD_VS_FLAGS[solver]
  assert gw.options_from_flags(solver, **flag_values) == record
  got = gw.gw_distance(*small, options=record)
  via_flags = gw.gw_distance(*small, options=gw.options_from_flags(solver, **flag_values))
  np.testing.assert_allclose(got.value, via_flags.value, rtol=1e-12)
  assert (got.converged, got.iterations, got.solver) == (via_flags.converged,
                                                          via_flags.iterations, solver)
  # Equal to the old API's value up to the machine's round-off (float64 for cg).
  np.testing.assert_allclose(got.value, before, rtol=1e-9 if solver == "cg" else 1e-4)


def test_result_is_a_pytree_and_jit_returnable(small):
  x, y = small
  opts = gw.CGOptions(precision="float32")
  res = gw.gw_distance(x, y, options=opts)
  assert isinstance(res, gw.GWResult) and res.solver == "cg"
  assert len(jax.tree.leaves(res)) == 4  # value, converged, iterations, unit; solver is static.
  doubled = jax.tree.map(lambda v: 2 * v, res)
  assert isinstance(doubled, gw.GWResult) and doubled.solver == "cg"
  assert doubled.value == 2 * res.value and doubled.iterations == 2 * res.iterations
  # A batch of results stacks into one GWResult of arrays.
  stacked = jax.tree.map(lambda *v: np.stack(v), res, res)
  assert stacked.value.shape == (2,) and stacked.solver == "cg"

  @jax.jit
  def solve(cx, cy, unit):
    value, converged, iterations = gw.solve_normalized(cx, cy, opts)
    return gw.GWResult(value=value * unit ** 2, converged=converged, iterations=iterations,
                       unit=unit, solver=opts.solver)

  out = solve(*gw.prepare_costs(x, y))
  assert isinstance(out, gw.GWResult) and out.solver == "cg"
  np.testing.assert_allclose(float(out.value), res.value, rtol=1e-6)
  assert int(out.iterations) == res.iterations and bool(out.converged) == res.converged
  np.testing.assert_allclose(float(out.unit), res.unit, rtol=1e-6)


@pytest.mark.parametrize("cls, field, bad", [
    (gw.AnnealedOptions, "epsilons", ()),
    (gw.AnnealedOptions, "epsilons", (1e-2, -1e-3)),
    (gw.AnnealedOptions, "epsilons", ("1e-2",)),
    (gw.AnnealedOptions, "stage_iterations", 0),
    (gw.AnnealedOptions, "gw_iterations", 2.5),
    (gw.AnnealedOptions, "sinkhorn_iterations", 0),
    (gw.AnnealedOptions, "polish", "yes"),
    (gw.AnnealedOptions, "cg_iterations", 0),
    (gw.AnnealedOptions, "cg_tol", -1e-6),
    (gw.AnnealedOptions, "precision", "float16"),
    (gw.EntropicOptions, "epsilon", 0.0),
    (gw.EntropicOptions, "epsilon", float("nan")),
    (gw.EntropicOptions, "gw_iterations", 0),
    (gw.EntropicOptions, "sinkhorn_iterations", -3),
    (gw.EntropicOptions, "polish", 1),
    (gw.EntropicOptions, "cg_iterations", 0),
    (gw.EntropicOptions, "cg_tol", float("inf")),
    (gw.EntropicOptions, "precision", "half"),
    (gw.CGOptions, "iterations", 0),
    (gw.CGOptions, "tol", -1.0),
    (gw.CGOptions, "precision", "bfloat16"),
    (gw.LowRankOptions, "rank", 0),
    (gw.LowRankOptions, "epsilon", -1e-3),
    (gw.LowRankOptions, "iterations", True),
    (gw.LowRankOptions, "gamma", 0.0),
    (gw.LowRankOptions, "precision", "auto "),
])
def test_options_reject_bad_values_with_one_line_naming_the_field(cls, field, bad):
  with pytest.raises(ValueError) as e:
    cls(**{field: bad})
  msg = str(e.value)
  assert msg.startswith(f"{cls.__name__}.{field} must be ") and "\n" not in msg, msg


def test_options_records_are_frozen_hashable_and_typed(small):
  for cls in gw.OPTIONS.values():
    a, b = cls(), cls()
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
      a.precision = "float64"
  assert gw.AnnealedOptions(epsilons=[1e-2, 1e-3]).epsilons == (1e-2, 1e-3)  # Made hashable.
  assert gw.AnnealedOptions() != gw.EntropicOptions()
  assert [gw.OPTIONS[s].solver for s in gw.SOLVERS] == list(gw.SOLVERS)
  assert gw.CGOptions().dtype == np.float64 and gw.AnnealedOptions().dtype == np.float32
  with pytest.raises(TypeError, match="options must be one of AnnealedOptions, EntropicOptions"):
    gw.gw_distance(*small, options="cg")
  with pytest.raises(TypeError, match="takes LowRankOptions"):
    gw.lowrank_gw_large(*small, options=gw.CGOptions())
  with pytest.raises(ValueError, match="runs in float32"):
    gw.lowrank_gw_large(*small, options=gw.LowRankOptions(precision="float64"))


# Every --gw_* flag of a solver's options, each set to a non-default value.
_ALL_FLAGS = {"gw_epsilon": 2e-3, "gw_anneal_epsilons": ["0.02", "0.004"],
              "gw_anneal_iterations": 3, "gw_sinkhorn_iterations": 123,
              "gw_anneal_sinkhorn_iterations": 7, "gw_iterations": 17, "gw_cg_iterations": 99,
              "gw_cg_tol": 1e-7, "gw_polish": False, "gw_rank": 5, "gw_lowrank_iterations": 44,
              "gw_lowrank_gamma": 20.0, "gw_oracle": "device", "gw_precision": "float64"}


def test_flags_map_to_each_solvers_record():
  assert set(_ALL_FLAGS) == set(gw.FLAGS)
  want = {
      "annealed": gw.AnnealedOptions(epsilons=(0.02, 0.004), stage_iterations=3, gw_iterations=17,
                                     sinkhorn_iterations=7, polish=False, cg_iterations=99,
                                     cg_tol=1e-7, oracle="device", precision="float64"),
      "entropic": gw.EntropicOptions(epsilon=2e-3, gw_iterations=17, sinkhorn_iterations=123,
                                     polish=False, cg_iterations=99, cg_tol=1e-7,
                                     oracle="device", precision="float64"),
      "cg": gw.CGOptions(iterations=99, tol=1e-7, oracle="device", precision="float64"),
      "lowrank": gw.LowRankOptions(rank=5, epsilon=2e-3, iterations=44, gamma=20.0,
                                   precision="float64"),
  }
  assert set(want) == set(gw.SOLVERS)
  for solver, record in want.items():
    got = gw.options_from_flags(solver, **_ALL_FLAGS)
    assert type(got) is type(record) and got == record, solver
    assert gw.options_from_flags(solver) == type(record)()  # No flags: the defaults.
    assert gw.options_from_flags(solver, gw_cg_tol=None, gw_rank=None) == type(record)()


@pytest.mark.parametrize("solver, flag_values, match", [
    ("annealed", {"gw_anneal_epsilons": ["0", "1e-3"]},
     r"--gw_anneal_epsilons: AnnealedOptions\.epsilons must be"),
    ("annealed", {"gw_anneal_epsilons": ["a"]}, r"--gw_anneal_epsilons must be numbers"),
    ("annealed", {"gw_anneal_iterations": 0}, r"--gw_anneal_iterations: AnnealedOptions\.stage_"),
    ("entropic", {"gw_epsilon": 0.0}, r"--gw_epsilon: EntropicOptions\.epsilon must be > 0"),
    ("cg", {"gw_cg_iterations": 0}, r"--gw_cg_iterations: CGOptions\.iterations must be"),
    ("lowrank", {"gw_lowrank_gamma": 0.0}, r"--gw_lowrank_gamma: LowRankOptions\.gamma must be"),
    ("lowrank", {"gw_precision": "float16"}, r"--gw_precision: LowRankOptions\.precision must be"),
])
def test_flag_errors_name_the_flag_in_one_line(solver, flag_values, match):
  with pytest.raises(ValueError, match=match) as e:
    gw.options_from_flags(solver, **flag_values)
  assert "\n" not in str(e.value)


def test_score_flag_defaults_are_the_records_defaults():
  """The score binary's --gw_* defaults give every solver exactly its record's defaults."""
  from absl import flags
  from vlmsel_jax.scoring import flags as scoring_flags  # Defines the --gw_* flags.
  assert {f.name for f in scoring_flags.GW_FLAGS} == set(gw.FLAGS)
  defaults = {f: flags.FLAGS[f].default for f in gw.FLAGS}
  for solver, cls in gw.OPTIONS.items():
    assert gw.options_from_flags(solver, **defaults) == cls(), solver
  assert flags.FLAGS["gw_solver"].default == "annealed"
