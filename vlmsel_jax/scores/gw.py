"""Gromov-Wasserstein distance between a candidate's features and the paired text features.

METHODS §1: GW(X, Y) = min over couplings π with uniform marginals of
Σ_{ijkl} (D^X_ik − D^Y_jl)² π_ij π_kl, with D^X scaled by median(D^Y) / median(D^X).
Whatever solver finds π, the value reported is this *unregularized* objective of the returned
coupling, so values from different solvers are directly comparable (lower = better answer).

Options in, records out (as ott-jax):

  res = gw_distance(x, y, options=AnnealedOptions(epsilons=(1e-2, 2e-3)))
  res.value, res.converged, res.iterations        # a GWResult (a pytree)
  results = gw_distances(candidates, y, options=CGOptions())    # one GWResult per candidate

Each solver takes its own frozen options record, validated when built (a one-line ValueError
naming the field). ``options_from_flags(solver, **flag_values)`` is the one place the score
binary's ``--gw_*`` flags become a record.

Solvers (``options=``):
  * ``AnnealedOptions`` (``"annealed"``, the default): ott-jax entropic GW over a decreasing ε
    schedule, each stage warm-started from the previous coupling, then a conditional-gradient
    polish (below) from the entropic coupling. Annealing finds a better basin than CG from the
    product coupling; the polish removes the entropic blur. This reaches POT-CG objectives or
    lower (benchmarks/). Its linearized problems get only ``sinkhorn_iterations`` (10) Sinkhorn
    iterations each, warm-started from the previous potentials: the stage only has to land in
    a good basin, and the polish then converges on the exact objective. Its coupling is rounded
    onto the exact marginals (Altschuler et al. 2017) before the polish, so every CG iterate is
    a coupling.
  * ``EntropicOptions`` (``"entropic"``): one ott-jax ``GromovWasserstein`` solve at a fixed ε.
  * ``CGOptions`` (``"cg"``): conditional gradient (Frank-Wolfe with exact line search) from the
    product coupling, the method of POT's ``ot.gromov.gromov_wasserstein``.
  * ``LowRankOptions`` (``"lowrank"``): ott-jax low-rank GW (coupling of rank ``rank``) for
    large n. A rank-r coupling cannot match samples one-to-one inside a cluster, so its
    objective is an upper bound of the dense one; compare low-rank values only with low-rank
    values of the same rank.

Units: both distance matrices are divided by median(D^Y) before solving, so ε is relative to a
problem whose typical distance is 1 (and does not depend on the distance's units); the reported
GW is multiplied back by median(D^Y)², i.e. it is in the text space's squared units as in §1.

The linear minimisation oracle of the CG steps is an exact linear assignment: with n×n uniform
marginals the vertices of the transport polytope are permutations (Birkhoff), so the exact EMD of
POT's CG is a linear assignment problem. The records with CG steps choose where it is solved
(``oracle``):

  * "host": through ``jax.pure_callback`` by POT's network simplex (``ot.emd``, whose basic
    solutions here are permutations; faster than SciPy's LAPJV on these gradients:
    benchmarks/README.md), falling back to SciPy's ``linear_sum_assignment`` if the simplex
    stops at its iteration cap. Every CG iteration copies the n×n gradient to the host and waits
    for it; the batched and row-sharded paths run the CG steps per candidate on one device.
  * "device": the ε-scaled auction algorithm of ``assignment.py`` (within n·1e-5·R of the
    optimal permutation's cost, R the gradient's spread; each call warm-started from the
    previous call's prices, the first from the entropic stage's dual when there is one). No
    callback anywhere: ``gw_distances`` runs the whole solve as one program vmapped (or
    mapped) over candidates and sharded over devices, and a row-sharded problem
    (``gw_distance(..., devices=...)``) keeps its CG steps partitioned.
  * "auto" (the default): device on GPU/TPU, host on CPU. Measured on CPU
    (benchmarks/gw_device_vs_pot.py) both reach the same objective in about the same time
    (within 20% either way at n = 250 – 2000, one problem or 16 batched), so CPU keeps the
    simplex, whose answers are exact, and every CPU result recorded with it stays as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from ott.geometry import geometry
from ott.geometry import low_rank
from ott.initializers.linear import initializers_lr
from ott.problems.quadratic import quadratic_problem
from ott.solvers.linear import sinkhorn
from ott.solvers.quadratic import gromov_wasserstein as ott_gw
from ott.solvers.quadratic import gromov_wasserstein_lr as ott_gw_lr

from vlmsel_jax.runtime import parallel
from vlmsel_jax.scores import assignment
from vlmsel_jax.scores import checks
from vlmsel_jax.scores import distances
from vlmsel_jax.scores import linalg

# ----------------------------------------------------------------------------------------------
# Options in: one frozen record per solver.

PRECISIONS = ("auto", "float32", "float64")
# Where the CG steps' linear assignments are solved: "host" (POT's network simplex through a
# callback), "device" (the auction of assignment.py, no callback), "auto" (device on GPU/TPU,
# host on CPU, where the two are even at the same objective and the simplex is exact:
# benchmarks/gw_device_vs_pot.py).
ORACLES = ("auto", "host", "device")


class OptionError(ValueError):
  """A bad value in a solver's options record; ``field`` names the record's field."""

  def __init__(self, record: Any, field: str, requirement: str):
    self.field = field
    super().__init__(f"{type(record).__name__}.{field} must be {requirement}, "
                     f"got {getattr(record, field)!r}")


class _SolverOptions:
  """What every options record has: the solver's name, its precision and its CG steps.

  The records are frozen (hashable) dataclasses: the jitted solvers take them as static
  arguments, and each is validated when it is built.
  """
  solver: ClassVar[str]
  _auto_dtype: ClassVar[type] = np.float32
  precision: str

  @property
  def dtype(self) -> type:
    """The arithmetic's float type: ``precision``, where "auto" is the solver's own choice."""
    if self.precision == "auto":
      return self._auto_dtype
    return np.dtype(self.precision).type

  def cg_steps(self) -> tuple[int, float] | None:
    """(maximum iterations, tolerance) of the CG steps after the coupling stage; None: none."""
    return None

  def _cg_tol(self, tol: float | None) -> float:
    # POT's 1e-9 in float64; float32's round-off (~1e-7) makes 1e-6 the useful floor there.
    if tol is not None:
      return tol
    return 1e-9 if self.dtype == np.float64 else 1e-6

  def _check_counts(self, *fields: str):
    for f in fields:
      v = getattr(self, f)
      if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1):
        raise OptionError(self, f, "an integer >= 1")

  def _check_positive(self, *fields: str):
    for f in fields:
      v = getattr(self, f)
      if not (_is_real(v) and 0 < v < float("inf")):
        raise OptionError(self, f, "> 0")

  def cg_oracle(self, platform: str | None = None) -> str:
    """Where the CG steps' assignments are solved on ``platform``: "host" or "device".

    ``platform`` is the backend the solve runs on ("cpu", "gpu", "tpu"; None: jax's default
    backend); it resolves ``oracle="auto"``. Records without CG steps answer "device".
    """
    oracle = getattr(self, "oracle", "device")
    if oracle != "auto":
      return oracle
    platform = platform or jax.default_backend()
    return "host" if platform == "cpu" else "device"

  def _check_common(self, tol_field: str | None = None, polish: bool = False):
    if self.precision not in PRECISIONS:
      raise OptionError(self, "precision", f"one of {', '.join(PRECISIONS)}")
    if hasattr(self, "oracle") and self.oracle not in ORACLES:
      raise OptionError(self, "oracle", f"one of {', '.join(ORACLES)}")
    if tol_field is not None:
      tol = getattr(self, tol_field)
      if tol is not None and not (_is_real(tol) and 0 <= tol < float("inf")):
        raise OptionError(self, tol_field, ">= 0 or None (POT's default)")
    if polish and not isinstance(self.polish, bool):
      raise OptionError(self, "polish", "True or False")


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnnealedOptions(_SolverOptions):
  """The default solver: entropic GW over a decreasing ε schedule, then a CG polish.

  Attributes:
    epsilons: the ε schedule, largest first (relative units: module docstring).
    stage_iterations: outer GW iterations of each stage but the last.
    gw_iterations: maximum outer iterations of the last stage.
    sinkhorn_iterations: Sinkhorn iterations per linearized problem, warm-started from the
      previous potentials. Measured on the 12 synthetic problems at n = 250, 500, 1000: 10 gives
      the same final objectives as 300 (all within 0.5% of or below POT CG) in less time
      (benchmarks/README.md).
    polish: run the CG polish from the annealed coupling.
    cg_iterations: maximum Frank-Wolfe iterations of the polish.
    cg_tol: stop the polish when the relative decrease of the objective falls below this;
      None = POT's 1e-9 in float64, 1e-6 in float32 (whose round-off is ~1e-7).
    oracle: where the polish's linear assignments are solved: "host" (POT's network simplex
      through ``jax.pure_callback``), "device" (the auction algorithm of ``assignment``, no
      callback: the whole solve stays on the accelerator and batches run vmapped and sharded
      end to end) or "auto" (device on GPU/TPU, host on CPU, where it is faster).
    precision: "auto" (float32), "float32" or "float64".
  """
  solver: ClassVar[str] = "annealed"
  epsilons: tuple[float, ...] = (1e-2, 5e-3, 2e-3)
  stage_iterations: int = 10
  gw_iterations: int = 50
  sinkhorn_iterations: int = 10
  polish: bool = True
  cg_iterations: int = 1000
  cg_tol: float | None = None
  oracle: str = "auto"
  precision: str = "auto"

  def __post_init__(self):
    try:
      epsilons = tuple(self.epsilons)
    except TypeError:
      raise OptionError(self, "epsilons", "a sequence of numbers > 0") from None
    if not epsilons or not all(_is_real(e) and 0 < e < float("inf") for e in epsilons):
      raise OptionError(self, "epsilons", "a non-empty sequence of numbers > 0")
    object.__setattr__(self, "epsilons", tuple(float(e) for e in epsilons))  # Hashable.
    self._check_counts("stage_iterations", "gw_iterations", "sinkhorn_iterations",
                       "cg_iterations")
    self._check_common("cg_tol", polish=True)

  def cg_steps(self) -> tuple[int, float] | None:
    return (self.cg_iterations, self._cg_tol(self.cg_tol)) if self.polish else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EntropicOptions(_SolverOptions):
  """One ott-jax entropic GW solve at a fixed ε, then (optionally) a CG polish.

  Attributes:
    epsilon: entropic regularization (relative units: module docstring).
    gw_iterations: maximum outer iterations.
    sinkhorn_iterations: maximum Sinkhorn iterations per linearized problem (warm-started from
      the previous outer iteration's potentials, so a few hundred suffice).
    polish: run the CG polish from the entropic coupling.
    cg_iterations, cg_tol, oracle, precision: as ``AnnealedOptions``.
  """
  solver: ClassVar[str] = "entropic"
  epsilon: float = 1e-3
  gw_iterations: int = 50
  sinkhorn_iterations: int = 300
  polish: bool = True
  cg_iterations: int = 1000
  cg_tol: float | None = None
  oracle: str = "auto"
  precision: str = "auto"

  def __post_init__(self):
    self._check_positive("epsilon")
    self._check_counts("gw_iterations", "sinkhorn_iterations", "cg_iterations")
    self._check_common("cg_tol", polish=True)

  def cg_steps(self) -> tuple[int, float] | None:
    return (self.cg_iterations, self._cg_tol(self.cg_tol)) if self.polish else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CGOptions(_SolverOptions):
  """Conditional gradient from the product coupling: POT's ``ot.gromov.gromov_wasserstein``.

  Attributes:
    iterations: maximum Frank-Wolfe iterations (POT's 1000, METHODS §1).
    tol: stop when the relative decrease of the objective falls below this; None = POT's 1e-9
      in float64, 1e-6 in float32.
    oracle: "host", "device" or "auto", as ``AnnealedOptions``. From the product coupling the
      path depends on how near-tied oracle answers are broken, so "device" follows POT's path
      less closely than "host" (the auction breaks ties differently from the simplex).
    precision: "auto" (float64), "float32" or "float64". CG from the product coupling is
      path-dependent: in float32, round-off in the first near-tied oracle answers sends it to
      another local minimum than POT's float64 run (measured on 12 synthetic problems: ratios
      to POT from 0.03 to 3.4); in float64 it follows POT's path (all 12 ratios 1.000).
  """
  solver: ClassVar[str] = "cg"
  _auto_dtype: ClassVar[type] = np.float64
  iterations: int = 1000
  tol: float | None = None
  oracle: str = "auto"
  precision: str = "auto"

  def __post_init__(self):
    self._check_counts("iterations")
    self._check_common("tol")

  def cg_steps(self) -> tuple[int, float] | None:
    return self.iterations, self._cg_tol(self.tol)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankOptions(_SolverOptions):
  """ott-jax low-rank GW (k-means initialized) for large n; no CG steps.

  Attributes:
    rank: rank of the coupling.
    epsilon: entropic regularization of the mirror-descent steps (relative units).
    iterations: maximum outer iterations.
    gamma: mirror-descent step size.
    precision: "auto" (float32), "float32" or "float64".
  """
  solver: ClassVar[str] = "lowrank"
  rank: int = 32
  epsilon: float = 1e-3
  iterations: int = 500
  gamma: float = 100.0
  precision: str = "auto"

  def __post_init__(self):
    self._check_counts("rank", "iterations")
    self._check_positive("epsilon", "gamma")
    self._check_common()


SolverOptions = AnnealedOptions | EntropicOptions | CGOptions | LowRankOptions
OPTIONS = {cls.solver: cls for cls in (AnnealedOptions, EntropicOptions, CGOptions,
                                       LowRankOptions)}
SOLVERS = tuple(OPTIONS)


def _check_options(options) -> SolverOptions:
  if not isinstance(options, tuple(OPTIONS.values())):
    raise _not_options(options)
  return options


def _not_options(options) -> TypeError:
  return TypeError(f"options must be one of {', '.join(c.__name__ for c in OPTIONS.values())}, "
                   f"got {options!r} (gw.options_from_flags builds one from a solver name)")


# ----------------------------------------------------------------------------------------------
# Flags → options: the one place the score binary's --gw_* flag names meet the records.

# For each solver, the record field each --gw_* flag sets. A flag not listed for the chosen
# solver belongs to another solver and is ignored.
FLAG_FIELDS: dict[type, dict[str, str]] = {
    AnnealedOptions: {"gw_anneal_epsilons": "epsilons", "gw_anneal_iterations": "stage_iterations",
                      "gw_iterations": "gw_iterations",
                      "gw_anneal_sinkhorn_iterations": "sinkhorn_iterations",
                      "gw_polish": "polish", "gw_cg_iterations": "cg_iterations",
                      "gw_cg_tol": "cg_tol", "gw_oracle": "oracle", "gw_precision": "precision"},
    EntropicOptions: {"gw_epsilon": "epsilon", "gw_iterations": "gw_iterations",
                      "gw_sinkhorn_iterations": "sinkhorn_iterations", "gw_polish": "polish",
                      "gw_cg_iterations": "cg_iterations", "gw_cg_tol": "cg_tol",
                      "gw_oracle": "oracle", "gw_precision": "precision"},
    CGOptions: {"gw_cg_iterations": "iterations", "gw_cg_tol": "tol", "gw_oracle": "oracle",
                "gw_precision": "precision"},
    LowRankOptions: {"gw_epsilon": "epsilon", "gw_rank": "rank",
                     "gw_lowrank_iterations": "iterations", "gw_lowrank_gamma": "gamma",
                     "gw_precision": "precision"},
}
FLAGS = tuple(sorted({flag for table in FLAG_FIELDS.values() for flag in table}))


def options_from_flags(solver: str, **flag_values) -> SolverOptions:
  """The options record of ``solver`` (``--gw_solver``) from the other ``--gw_*`` flag values.

  ``flag_values`` are keyed by flag name (any of ``FLAGS``: ``gw_anneal_epsilons=["1e-2",
  "5e-3"]``, ``gw_cg_iterations=1000``, ...). Flags of other solvers are ignored; a value of
  None leaves the record's default. Errors are one-line ValueErrors naming the flag.
  """
  if solver not in OPTIONS:
    raise ValueError(f"unknown GW solver {solver!r}; choose one of {', '.join(SOLVERS)}")
  unknown = sorted(set(flag_values) - set(FLAGS))
  if unknown:
    raise ValueError(f"unknown GW solver option(s) {', '.join(unknown)}; "
                     f"known: {', '.join(FLAGS)}")
  cls = OPTIONS[solver]
  table = FLAG_FIELDS[cls]
  fields = {}
  for flag, value in flag_values.items():
    if flag not in table or value is None:
      continue
    if flag == "gw_anneal_epsilons":  # A list flag: strings.
      try:
        value = tuple(float(e) for e in value)
      except (TypeError, ValueError):
        raise ValueError(f"--gw_anneal_epsilons must be numbers, got {value}") from None
    fields[table[flag]] = value
  try:
    return cls(**fields)
  except OptionError as e:
    flag = next(f for f, field in table.items() if field == e.field)
    raise ValueError(f"--{flag}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Records out.


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("value", "converged", "iterations", "unit"),
                   meta_fields=("solver",))
@dataclasses.dataclass(frozen=True)
class GWResult:
  """What ``gw_distance`` returns: the GW value and the solver's diagnostics.

  A pytree (``jax.tree.map`` maps the four numbers; ``solver`` is static), so it can also be
  returned from a jitted function. ``gw_distance`` fills it with host (Python) scalars.

  Attributes:
    value: the unregularized GW objective of the solver's coupling, in the original units (the
      text space's squared distance units, METHODS §1); lower = closer.
    converged: whether the solver met its tolerance within its iteration budget (for
      ``annealed`` / ``entropic`` with polish: both stages did). ``value`` is the objective of
      the returned coupling either way.
    iterations: outer GW iterations plus CG iterations.
    unit: median(D^Y), the distance unit the solver worked in: value = unit² × the objective
      of the normalized problem (module docstring).
    solver: the solver's name (one of SOLVERS).
  """
  value: float
  converged: bool
  iterations: int
  unit: float
  solver: str


def _result(gw, conv, iters, unit, opts: SolverOptions) -> GWResult:
  return GWResult(value=float(gw) * float(unit) ** 2, converged=bool(conv),
                  iterations=int(iters), unit=float(unit), solver=opts.solver)


class CouplingStage(NamedTuple):
  """What ``coupling_stage`` returns (a pytree): where the CG steps start.

  Attributes:
    coupling: (n, n) the stage's coupling.
    converged: whether the stage met its tolerance.
    iterations: the stage's outer iterations.
    prices: (n,) dual prices for the device oracle's first auction, in the GW gradient's units:
      minus twice the column potential of the stage's last Sinkhorn solve (ott's linearized
      cost is half our gradient: ``_cg_from``). NaN where the stage has no dual (CG's product
      start, low rank): that auction then starts cold, from the column reduction.
  """
  coupling: jax.Array
  converged: jax.Array
  iterations: jax.Array
  prices: jax.Array


# ----------------------------------------------------------------------------------------------
# The objective.


def gw_objective(cx: jax.Array, cy: jax.Array, coupling: jax.Array) -> jax.Array:
  """Σ_{ijkl} (cx_ik − cy_jl)² π_ij π_kl for symmetric cx, cy, in O(n³) not O(n⁴).

  Expanding the square: Σ_i p_i (cx² p)_i + Σ_j q_j (cy² q)_j − 2 ⟨cx π cy, π⟩ with p, q the
  marginals of π (the actual ones, so an approximately feasible coupling is scored exactly).
  """
  p = coupling.sum(axis=1)
  q = coupling.sum(axis=0)
  cross = jnp.sum((cx @ coupling @ cy) * coupling)
  return p @ (cx * cx) @ p + q @ (cy * cy) @ q - 2.0 * cross


# ----------------------------------------------------------------------------------------------
# Conditional gradient with an exact linear-assignment oracle.


def _assignment_host(cost: np.ndarray) -> np.ndarray:
  """The minimum-cost permutation of a square matrix: POT's network simplex, else LAPJV."""
  # POT is imported here, not with the module: its import pulls in torch whenever torch is
  # installed (to offer a torch backend), and only this oracle needs it.
  import ot  # pylint: disable=g-import-not-at-top
  cost = np.asarray(cost, np.float64)
  n = cost.shape[0]
  uniform = np.full(n, 1.0 / n)
  plan, log = ot.emd(uniform, uniform, cost, numItermax=max(100_000, 50 * n * n), log=True)
  cols = np.argmax(plan, axis=1)
  # A basic optimal solution here is a permutation / n; anything else (the iteration cap was
  # hit, or a degenerate basis left a split row) goes to the exact assignment solver.
  if log.get("result_code") == 1 and np.array_equal(np.sort(cols), np.arange(n)) and \
      np.allclose(plan[np.arange(n), cols], 1.0 / n, rtol=1e-6, atol=0.0):
    return cols.astype(np.int32)
  _, cols = scipy.optimize.linear_sum_assignment(cost)
  return cols.astype(np.int32)


def _linear_assignment(cost: jax.Array) -> jax.Array:
  """Column index assigned to each row by the minimum-cost permutation of an n×n matrix."""
  n = cost.shape[0]
  return jax.pure_callback(_assignment_host, jax.ShapeDtypeStruct((n,), jnp.int32), cost,
                           vmap_method="sequential")


# The device oracle's auction (assignment.py), ε relative to the gradient's spread R: the final
# ε (its permutation is within n·ε of the optimal one); the first ε of the calls after the first,
# warm-started from the previous call's prices; the first ε of the first call when the coupling
# stage left dual prices (``CouplingStage.prices``: entropic potentials, blurred by the stage's
# ε, so a coarser start than a previous call's exact prices: assignment.py, "What was tried").
# Without them the first call starts cold, from the column reduction, at assignment.EPS_START.
DEVICE_ORACLE_TOL = 1e-5
DEVICE_ORACLE_WARM_EPS = 1e-3
DEVICE_ORACLE_DUAL_EPS = 1e-2


def _cg_from(cx: jax.Array, cy: jax.Array, coupling: jax.Array, max_iterations: int,
             tol: float, oracle: str = "host", prices: jax.Array | None = None):
  """Frank-Wolfe on the GW objective from ``coupling``; returns (coupling, converged, iters,
  oracle rounds).

  Every oracle answer is a permutation S/n, so cx S cy = cx[:, σ⁻¹-ordered] cy costs one matmul
  and cx π cy is updated in place along the segment: one n³ product per iteration.
  ``oracle``: "host" (``_linear_assignment``, a callback) or "device" (``assignment.auction``,
  each call warm-started from the previous call's prices; its bidding rounds are counted).
  ``prices``: the device oracle's start for the first call (``CouplingStage.prices``); None or
  any non-finite entry: a cold start.
  """
  if oracle not in ("host", "device"):
    raise ValueError(f"oracle must be 'host' or 'device' here, got {oracle!r}")
  n = cx.shape[0]
  cx2, cy2 = cx * cx, cy * cy

  def lmo(grad, prices, it):
    if oracle == "host":
      return _linear_assignment(grad), prices, jnp.array(0, jnp.int32)
    eps_start = jnp.where(it == 0, first_eps, DEVICE_ORACLE_WARM_EPS)
    out = assignment.auction(grad, prices=prices, eps_start=eps_start, tol=DEVICE_ORACLE_TOL)
    return out.cols, out.prices, out.rounds

  def parts(t, cxtcy):
    p, q = t.sum(axis=1), t.sum(axis=0)
    return p, q, p @ cx2 @ p + q @ cy2 @ q - 2.0 * jnp.sum(cxtcy * t)

  def gradient(t, cxtcy):
    p, q = t.sum(axis=1), t.sum(axis=0)
    return 2.0 * (cx2 @ p)[:, None] + 2.0 * (cy2 @ q)[None, :] - 4.0 * cxtcy

  def body(state):
    t, cxtcy, value, _, it, _, prices, rounds = state
    p, q = t.sum(axis=1), t.sum(axis=0)
    grad = gradient(t, cxtcy)
    cols, prices, lmo_rounds = lmo(grad, prices, it)
    s = jax.nn.one_hot(cols, n, dtype=t.dtype) / n
    # cx S cy with S_{i, σ(i)} = 1/n:  (S cy)_{i,:} = cy[σ(i), :] / n.
    cxscy = cx @ (cy[cols, :] / n)
    delta = s - t
    pd, qd = delta.sum(axis=1), delta.sum(axis=0)
    cxdcy = cxscy - cxtcy
    # value(t + a·delta) = value + b·a + c·a² (exact: the objective is quadratic in π).
    c = pd @ cx2 @ pd + qd @ cy2 @ qd - 2.0 * jnp.sum(cxdcy * delta)
    b = 2.0 * (pd @ cx2 @ p + qd @ cy2 @ q) - 2.0 * (jnp.sum(cxtcy * delta) + jnp.sum(cxdcy * t))
    step_convex = jnp.clip(-b / jnp.where(c > 0, 2.0 * c, 1.0), 0.0, 1.0)
    step = jnp.where(c > 0, step_convex, jnp.where(b + c < 0, 1.0, 0.0))
    new_t = t + step * delta
    new_cxtcy = cxtcy + step * cxdcy
    _, _, new_value = parts(new_t, new_cxtcy)
    decrease = value - new_value
    converged = (step == 0.0) | (decrease <= tol * jnp.abs(new_value))
    # Never accept a step that round-off made worse.
    keep = new_value <= value
    t = jnp.where(keep, new_t, t)
    cxtcy = jnp.where(keep, new_cxtcy, cxtcy)
    value = jnp.minimum(new_value, value)
    return t, cxtcy, value, converged, it + 1, step, prices, rounds + lmo_rounds

  def cond(state):
    _, _, _, converged, it, *_ = state
    return (~converged) & (it < max_iterations)

  cxtcy = cx @ coupling @ cy
  _, _, value = parts(coupling, cxtcy)
  first_eps = assignment.EPS_START
  if oracle == "device":
    # The entropic stage's column potentials are nearly the first linear problem's optimal
    # dual: started there, the polish needs 12 – 26% fewer bidding rounds in all than from the
    # column reduction (assignment.py, "What was tried").
    cold = assignment.column_reduction_prices(gradient(coupling, cxtcy))
    if prices is None:
      prices = cold
    else:
      prices = jnp.asarray(prices, coupling.dtype)
      dual = jnp.all(jnp.isfinite(prices))
      prices = jnp.where(dual, prices, cold)
      first_eps = jnp.where(dual, DEVICE_ORACLE_DUAL_EPS, assignment.EPS_START)
  else:
    prices = jnp.zeros((n,), coupling.dtype)
  init = (coupling, cxtcy, value, jnp.array(False), jnp.array(0, jnp.int32),
          jnp.array(1.0, coupling.dtype), prices, jnp.array(0, jnp.int32))
  t, _, _, converged, iters, _, _, rounds = jax.lax.while_loop(cond, body, init)
  return t, converged, iters, rounds


# ----------------------------------------------------------------------------------------------
# ott-jax solvers on explicit cost-matrix geometries.


def _problem(cx: jax.Array, cy: jax.Array) -> quadratic_problem.QuadraticProblem:
  # Explicit cost matrices: PointCloud(scale_cost="max_cost") fails on current jax, and the
  # distance (angular by default) is ours to choose anyway.
  return quadratic_problem.QuadraticProblem(geometry.Geometry(cost_matrix=cx),
                                            geometry.Geometry(cost_matrix=cy))


@jax.tree_util.register_pytree_node_class
class _WarmStartedGW(ott_gw.GromovWasserstein):
  """ott-jax GromovWasserstein whose first Sinkhorn solve starts from given dual potentials.

  ott starts the first linearized problem of every solve from zero potentials. Between
  annealing stages the previous stage's potentials are a far better start (potentials are in
  cost units, so they carry over a change of ε): measured at n = 1000, the cold first solve of
  each stage was most of the annealed solver's time.
  """

  def __init__(self, *args, init_potentials=None, **kwargs):
    super().__init__(*args, **kwargs)
    self.init_potentials = init_potentials

  def init_state(self, prob, init):
    if self.init_potentials is None:
      return super().init_state(prob, init)
    # As ott's init_state (store_inner_errors=False), but the first solve is warm-started.
    linear_state = self.linear_solver(init, init=self.init_potentials)
    num_iter = self.max_iterations
    return ott_gw.GWState(
        costs=-jnp.ones((num_iter,)),
        linear_convergence=jnp.full((num_iter,), fill_value=jnp.nan),
        linear_state=linear_state, linear_pb=init,
        old_transport_mass=prob.init_transport_mass(), errors=None)

  def tree_flatten(self):
    children, aux = super().tree_flatten()
    return (*children, self.init_potentials), aux

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    *rest, potentials = children
    solver = super().tree_unflatten(aux_data, rest)
    solver.init_potentials = potentials
    return solver


def _entropic_stages(cx, cy, epsilons: Sequence[float], stage_iterations: int,
                     final_iterations: int, sinkhorn_iterations: int, *, inexact: bool = False):
  """ott-jax entropic GW at each ε in turn, each stage linearized at the previous coupling.

  Intermediate stages only move the coupling toward a good basin, so they run a fixed small
  number of outer iterations; the last stage runs to convergence (up to ``final_iterations``),
  and its convergence is the one reported. ``inexact``: the Sinkhorn solves are capped on
  purpose (``annealed``), so convergence means the outer GW costs settled before
  ``final_iterations``, not that every Sinkhorn solve converged as ott's flag requires.
  """
  prob = _problem(cx, cy)
  out, init = None, None
  iters = jnp.array(0, jnp.int32)
  for stage, eps in enumerate(epsilons):
    last = stage == len(epsilons) - 1
    potentials = None
    if out is not None:
      init = prob.update_linearization(out.linear_state, float(eps), out.old_transport_mass)
      potentials = (out.linear_state.f, out.linear_state.g)
    solver = _WarmStartedGW(
        sinkhorn.Sinkhorn(max_iterations=sinkhorn_iterations), epsilon=float(eps),
        max_iterations=final_iterations if last else stage_iterations,
        min_iterations=min(5, stage_iterations), warm_start=True, store_inner_errors=False,
        init_potentials=potentials)
    out = solver(prob, init=init)
    stage_iters = jnp.sum(out.costs != -1).astype(jnp.int32)
    iters = iters + stage_iters
  converged = stage_iters < final_iterations if inexact else out.converged
  # ott's linearized cost of the square loss, D^X² p + D^Y² q − 2 D^X π D^Y, is half the GW
  # gradient the CG steps take (_cg_from), and auction prices are minus column potentials.
  return out.matrix, converged, iters, -2.0 * out.linear_state.g


def round_to_marginals(t: jax.Array) -> jax.Array:
  """The nearby coupling with exactly uniform marginals (Altschuler et al. 2017, Alg. 2).

  Rows, then columns, are scaled down to at most their target mass, and the missing mass is
  added back as a rank-one term; entries stay non-negative.
  """
  n, m = t.shape
  r, c = jnp.full((n,), 1.0 / n, t.dtype), jnp.full((m,), 1.0 / m, t.dtype)
  t = t * jnp.minimum(r / jnp.maximum(t.sum(axis=1), 1e-30), 1.0)[:, None]
  t = t * jnp.minimum(c / jnp.maximum(t.sum(axis=0), 1e-30), 1.0)[None, :]
  err_r, err_c = r - t.sum(axis=1), c - t.sum(axis=0)
  return t + jnp.outer(err_r, err_c) / jnp.maximum(jnp.sum(err_c), 1e-30)


def _lowrank(cx, cy, rank: int, epsilon: float, iterations: int, gamma: float):
  # ott's default (random / rank-2) initializations sit at the product coupling, a stationary
  # point of low-rank GW here; the generalized k-means initialization starts from the data's
  # cluster structure and descends (measured: 0.196 vs 0.286 = the product coupling's value).
  solver = ott_gw_lr.LRGromovWasserstein(
      rank=rank, epsilon=epsilon, gamma=gamma,
      initializer=initializers_lr.GeneralizedKMeansInitializer(rank=rank),
      min_iterations=min(iterations, 50), max_iterations=iterations, inner_iterations=10)
  out = solver(_problem(cx, cy))
  return out.matrix, out.converged, jnp.asarray(out.n_iters, jnp.int32)


def coupling_stage(cx: jax.Array, cy: jax.Array, opts: SolverOptions) -> CouplingStage:
  """Everything before the CG steps (a ``CouplingStage``). No host callbacks.

  This is the part batched and sharded over devices (see ``gw_distances``).
  """
  n = cx.shape[0]
  no_dual = jnp.full((n,), jnp.nan, cx.dtype)
  if isinstance(opts, AnnealedOptions):
    coupling, converged, iters, prices = _entropic_stages(
        cx, cy, opts.epsilons, opts.stage_iterations, opts.gw_iterations,
        opts.sinkhorn_iterations, inexact=True)
    return CouplingStage(round_to_marginals(coupling), converged, iters, prices)
  if isinstance(opts, EntropicOptions):
    return CouplingStage(*_entropic_stages(cx, cy, (opts.epsilon,), opts.gw_iterations,
                                           opts.gw_iterations, opts.sinkhorn_iterations))
  if isinstance(opts, CGOptions):
    return CouplingStage(jnp.full((n, n), 1.0 / (n * n), cx.dtype), jnp.array(True),
                         jnp.array(0, jnp.int32), no_dual)
  if isinstance(opts, LowRankOptions):
    return CouplingStage(*_lowrank(cx, cy, opts.rank, opts.epsilon, opts.iterations,
                                   opts.gamma), no_dual)
  raise _not_options(opts)


def cg_stage(cx: jax.Array, cy: jax.Array, stage: CouplingStage, opts: SolverOptions,
             platform: str | None = None):
  """The CG steps (when ``opts`` has them) from ``stage`` and the objective: (gw, converged,
  iters).

  ``platform`` resolves ``oracle="auto"`` (None: jax's default backend).
  """
  coupling, converged, iterations = stage.coupling, stage.converged, stage.iterations
  if opts.cg_steps() is not None:
    coupling, cg_conv, cg_iters, _ = cg_polish(cx, cy, coupling, opts, platform,
                                               prices=stage.prices)
    converged = cg_conv if isinstance(opts, CGOptions) else converged & cg_conv
    iterations = iterations + cg_iters
  return gw_objective(cx, cy, coupling), converged, iterations


def cg_polish(cx: jax.Array, cy: jax.Array, coupling: jax.Array, opts: SolverOptions,
              platform: str | None = None, prices: jax.Array | None = None):
  """The CG steps of ``opts`` from ``coupling``: (coupling, converged, CG iterations, auction
  rounds). The rounds are the device oracle's bidding rounds, summed over its calls (0 with
  the host oracle); ``platform`` resolves ``oracle="auto"``; ``prices`` start the device
  oracle's first auction (``CouplingStage.prices``; None: cold). ``opts`` must have CG steps.
  """
  steps = opts.cg_steps()
  if steps is None:
    raise ValueError(f"{type(opts).__name__} has no CG steps (polish=False or lowrank)")
  return _cg_from(cx, cy, coupling, *steps, oracle=opts.cg_oracle(platform), prices=prices)


def solve_normalized(cx: jax.Array, cy: jax.Array, opts: SolverOptions):
  """Solves GW on two prepared n×n cost matrices; returns (gw, converged, iterations).

  Pure and jittable for fixed ``opts`` (a frozen, hashable options record).
  """
  return cg_stage(cx, cy, coupling_stage(cx, cy, opts), opts)


@functools.partial(jax.jit, static_argnames=("opts",))
def _solve_jit(cx, cy, opts: SolverOptions):
  return solve_normalized(cx, cy, opts)


@functools.partial(jax.jit, static_argnames=("opts",))
def _cg_stage_jit(cx, cy, stage: CouplingStage, opts: SolverOptions):
  return cg_stage(cx, cy, stage, opts)


# ----------------------------------------------------------------------------------------------
# Cost matrices from features.


@functools.partial(jax.jit, static_argnames=("distance", "scale"))
def prepare_costs(x: jax.Array, y: jax.Array, distance: str = "angular", scale: str = "median"):
  """Distance matrices of x and y, scale-aligned and divided by median(D^Y).

  Returns (cx, cy, unit) with GW in original units = unit² × GW(cx, cy).
  """
  dx = distances.pairwise_distances(x, distance)
  dy = distances.pairwise_distances(y, distance)
  dx, dy, _ = distances.align_scale(dx, dy, scale)
  unit = distances.median_off_diagonal(dy)
  return dx / unit, dy / unit, unit


def gw_distance(x, y, *, options: SolverOptions = AnnealedOptions(), distance: str = "angular",
                scale: str = "median", devices=None) -> GWResult:
  """GW distance between paired feature matrices x (n × d_x) and y (n × d_y).

  Args:
    x, y: features of the same n paired samples (row i of x pairs with row i of y).
    options: the solver and its settings: ``AnnealedOptions()`` (default), ``EntropicOptions``,
      ``CGOptions`` or ``LowRankOptions`` (see the module docstring).
    distance: intra-space distance, one of ``distances.DISTANCES``.
    scale: "median" (METHODS §1), "max" or "none".
    devices: None (one device) or several devices, possibly of several hosts, to split this
      one problem over: the n×n cost matrices and the coupling are sharded by rows on a 1-D
      ``samples`` mesh and XLA partitions the solver's products (see ``_solve_sharded``).

  Returns:
    A ``GWResult``: ``value`` (the unregularized GW objective of the returned coupling, lower =
    closer), ``converged``, ``iterations``, ``unit``, ``solver``.
  """
  opts = _check_options(options)
  x, y = checks.check_pair(x, y, "x", "y")
  _check_distance_args(distance, scale)
  opts = _resolve_oracle(opts, _platform(devices))
  with jax.enable_x64(opts.dtype == np.float64):
    if devices is not None and len(devices) > 1:
      return _solve_sharded(x.astype(opts.dtype), y.astype(opts.dtype), distance, scale, opts,
                            list(devices))
    cx, cy, unit = prepare_costs(x.astype(opts.dtype), y.astype(opts.dtype), distance, scale)
    _check_costs(cx, "x")
    gw, conv, iters = _solve_jit(cx, cy, opts)
    return _result(gw, conv, iters, unit, opts)


def _platform(devices) -> str:
  """The platform ("cpu", "gpu", "tpu") of ``devices`` (None: of jax's default devices)."""
  devices = jax.devices() if devices is None or len(devices) == 0 else list(devices)
  return devices[0].platform


def _resolve_oracle(opts: SolverOptions, platform: str) -> SolverOptions:
  """``opts`` with ``oracle="auto"`` replaced by what it means on ``platform``."""
  if getattr(opts, "oracle", None) == "auto":
    return dataclasses.replace(opts, oracle=opts.cg_oracle(platform))
  return opts


def _callback_free(opts: SolverOptions) -> bool:
  """No host callback in the solve: no CG steps, or CG steps with the device oracle."""
  return opts.cg_steps() is None or opts.cg_oracle() == "device"


@functools.lru_cache(maxsize=None)
def _sharded_programs(mesh: jax.sharding.Mesh, distance: str, scale: str, opts: SolverOptions):
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("samples", None))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  costs = jax.jit(functools.partial(prepare_costs, distance=distance, scale=scale),
                  in_shardings=(replicated, replicated),
                  out_shardings=(rows, rows, replicated))
  stage_shardings = CouplingStage(rows, replicated, replicated, replicated)
  stage = jax.jit(functools.partial(coupling_stage, opts=opts), in_shardings=(rows, rows),
                  out_shardings=stage_shardings)
  # Callback-free CG steps (device oracle) are partitioned like the rest; otherwise only the
  # objective is, and _solve_sharded runs the CG steps on one device.
  last = (functools.partial(cg_stage, opts=opts) if _callback_free(opts)
          else lambda cx, cy, st: (gw_objective(cx, cy, st.coupling), st.converged,
                                   st.iterations))
  finish = jax.jit(last, in_shardings=(rows, rows, stage_shardings), out_shardings=replicated)
  return costs, stage, finish


def _solve_sharded(x, y, distance, scale, opts: SolverOptions, devices):
  """One problem split over ``devices`` (any hosts): rows of every n×n matrix on one device each.

  The cost matrices are built sharded (no host holds them whole), the callback-free coupling
  stage runs as one GSPMD-partitioned program, and so does the objective, with the CG steps
  when their oracle is the device's (``oracle="device"``). The host oracle calls the host,
  which hung inside multi-device programs on XLA:CPU, so with it the CG steps run as a
  single-device program on every process's first local device, on gathered matrices: that
  stage needs the whole problem on one device of each host.
  """
  n = x.shape[0]
  if n % len(devices):
    raise ValueError(f"a sharded GW problem needs n divisible by the {len(devices)} devices, "
                     f"got n = {n}")
  mesh = parallel.make_mesh("samples:-1", devices)
  costs, stage, finish = _sharded_programs(mesh, distance, scale, opts)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  put = lambda v: jax.make_array_from_callback(v.shape, replicated, lambda idx: v[idx])
  cx, cy, unit = costs(put(x), put(y))
  if not parallel.gather_to_host(jnp.all(jnp.isfinite(cx))):
    raise _zero_median_error("x")
  start = stage(cx, cy)
  unit = parallel.gather_to_host(unit)
  if _callback_free(opts):
    gw, conv, iters = finish(cx, cy, start)
    return _result(*(parallel.gather_to_host(v) for v in (gw, conv, iters)), unit, opts)
  local = jax.local_devices()[0]
  on_one = jax.tree.map(lambda v: jax.device_put(parallel.gather_to_host(v), local),
                        (cx, cy, start))
  gw, conv, iters = _cg_stage_jit(*on_one, opts)
  return _result(gw, conv, iters, unit, opts)


def _check_distance_args(distance: str, scale: str):
  if distance not in distances.DISTANCES:
    raise ValueError(f"unknown distance {distance!r}; choose one of "
                     f"{', '.join(distances.DISTANCES)}")
  if scale not in distances.SCALES:
    raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(distances.SCALES)}")


def _check_costs(cx: jax.Array, name: str):
  # Median scaling divides by the median distance: a bank whose typical pair is at distance zero
  # (more than half the rows identical) cannot be scaled and would give inf/NaN GW.
  if not bool(jnp.all(jnp.isfinite(cx))):
    raise _zero_median_error(name)


def _zero_median_error(name: str) -> checks.FeatureError:
  return checks.FeatureError(
      f"{name}: the median pairwise distance is zero (most samples identical), "
      "so the distance matrix cannot be scale-aligned")


# ----------------------------------------------------------------------------------------------
# Many candidates in one call: vmapped over candidates, sharded over devices.


BATCH_MODES = ("auto", "vmap", "map")


def _resolve_batch_mode(mode: str, mesh: jax.sharding.Mesh) -> str:
  if mode not in BATCH_MODES:
    raise ValueError(f"unknown batch mode {mode!r}; choose one of {', '.join(BATCH_MODES)}")
  if mode == "auto":
    # A vmapped while-loop runs every candidate until the slowest one stops (lockstep). That is
    # free parallelism on an accelerator but pure waste on a CPU, whose cores a single problem's
    # matmuls already fill; there a sequential map over the device's block is faster.
    return "map" if mesh.devices.flat[0].platform == "cpu" else "vmap"
  return mode


@functools.lru_cache(maxsize=None)
def _batched_coupling_stage(opts: SolverOptions, mesh: jax.sharding.Mesh, mode: str):
  """jit(shard_map(vmap or map of coupling_stage)): each device runs its block of candidates.

  Only the callback-free part is batched: XLA:CPU was seen to hang when host callbacks (the CG
  oracle) run inside a program spanning several devices (a 2-device shard_map with a callback on
  a 200×200 operand never returns), while single-device programs with callbacks are fine. So
  the CG steps run per candidate on the device that holds it (``gw_distances``).
  """
  spec = jax.sharding.PartitionSpec(parallel.CANDIDATE_AXIS)
  vmapped = jax.vmap(coupling_stage, in_axes=(0, None, None))

  def local(cxs, cy):
    if mode == "map":
      return jax.lax.map(lambda cx: coupling_stage(cx, cy, opts), cxs)
    return vmapped(cxs, cy, opts)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec()),
                          out_specs=CouplingStage(spec, spec, spec, spec), check_vma=False)
  return jax.jit(sharded)


@functools.lru_cache(maxsize=None)
def _batched_solve(opts: SolverOptions, mesh: jax.sharding.Mesh, mode: str):
  """jit(shard_map(vmap or map of solve_normalized)): the whole solve, CG steps included.

  For solves without host callbacks (``_callback_free``: the device oracle, or no CG steps):
  each device runs its block of candidates end to end and returns (gw, converged, iters).
  """
  spec = jax.sharding.PartitionSpec(parallel.CANDIDATE_AXIS)
  platform = mesh.devices.flat[0].platform
  solve = lambda cx, cy: cg_stage(cx, cy, coupling_stage(cx, cy, opts), opts, platform)

  def local(cxs, cy):
    if mode == "map":
      return jax.lax.map(lambda cx: solve(cx, cy), cxs)
    return jax.vmap(solve, in_axes=(0, None))(cxs, cy)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec()),
                          out_specs=(spec, spec, spec), check_vma=False)
  return jax.jit(sharded)


def gw_distances(candidates: Sequence, y, *, options: SolverOptions = AnnealedOptions(),
                 distance: str = "angular", scale: str = "median", devices=None,
                 names: Sequence[str] | None = None,
                 batch_mode: str = "auto") -> list[GWResult]:
  """GW of every candidate feature matrix against y, solved in one batched, sharded call.

  Candidates share n with y and may have any widths. Their n×n cost matrices are stacked,
  padded to a multiple of the device count (padding repeats the last candidate and is dropped),
  placed with the candidate axis split over a 1-D ``Mesh`` of ``devices`` (default: all), and
  solved in one jitted call: ``batch_mode`` "vmap" (``jax.vmap`` of the solver), "map"
  (``jax.lax.map``, one candidate after another on each device) or "auto" (map on CPU, vmap on
  accelerators). ``options`` and the rest as ``gw_distance``. With the device oracle (or no CG
  steps) that call is the whole solve; with the host oracle the CG steps then run per
  candidate, each on the device that holds it (``_batched_coupling_stage``).

  Returns:
    One ``GWResult`` per candidate, in order (a list, so results zip with candidate names);
    each equals ``gw_distance`` of that candidate alone. One ``GWResult`` of arrays, if wanted:
    ``jax.tree.map(lambda *v: np.stack(v), *results)``.
  """
  opts = _check_options(options)
  if candidates is None or len(candidates) == 0:
    raise ValueError("gw_distances: the candidate list is empty")
  opts = _resolve_oracle(opts, _platform(devices))
  with jax.enable_x64(opts.dtype == np.float64):
    return _gw_distances(candidates, y, distance, scale, opts, devices, names, batch_mode)


def _gw_distances(candidates, y, distance, scale, opts, devices, names, batch_mode):
  names = list(names) if names is not None else [f"candidate {i}" for i in range(len(candidates))]
  _check_distance_args(distance, scale)
  y = checks.check_features(y, "text features")
  feats = [checks.check_pair(x, y, name, "text features")[0] for name, x in zip(names, candidates)]
  mesh = parallel.candidate_mesh(devices)
  k, n = len(feats), y.shape[0]
  padded = len(parallel.pad_to_multiple(list(range(k)), mesh.devices.size))
  spec = jax.sharding.PartitionSpec
  by_candidate = jax.sharding.NamedSharding(mesh, spec(parallel.CANDIDATE_AXIS))
  replicated = jax.sharding.NamedSharding(mesh, spec())
  # Each process builds the cost matrices of its own candidates only, each on the device that
  # holds it: with several hosts no host ever holds the whole k × n × n stack. Padding slots
  # repeat the last candidate (parallel.pad_to_multiple) and are dropped at the end.
  local = by_candidate.addressable_devices_indices_map((padded, n, n))
  blocks, cys, finite, unit = {}, {}, {}, None
  for device, index in local.items():
    rows = range(*index[0].indices(padded))
    y_dev = jax.device_put(y.astype(opts.dtype), device)
    cxs = []
    for i in rows:
      x_dev = jax.device_put(feats[min(i, k - 1)].astype(opts.dtype), device)
      cx, cy, unit = prepare_costs(x_dev, y_dev, distance, scale)
      cxs.append(cx)
    blocks[device], cys[device] = jnp.stack(cxs), cy
    finite[device] = jnp.all(jnp.isfinite(blocks[device]), axis=(1, 2))
  # Every process must raise the same error, so the per-candidate check is gathered first.
  ok = parallel.gather_to_host(_global(finite, (padded,), by_candidate))
  for i in range(k):
    if not ok[i]:
      raise _zero_median_error(names[i])
  stacked = _global(blocks, (padded, n, n), by_candidate)
  cy = _global(cys, (n, n), replicated)
  mode = _resolve_batch_mode(batch_mode, mesh)
  if _callback_free(opts):
    gws, conv, its = (parallel.gather_to_host(v)
                      for v in _batched_solve(opts, mesh, mode)(stacked, cy))
    return [_result(gws[i], conv[i], its[i], unit, opts) for i in range(k)]
  starts = _batched_coupling_stage(opts, mesh, mode)(stacked, cy)
  # Programs with host callbacks (CG) and multi-device programs (the stage above, the gathers
  # below) never run at the same time: each phase is waited for before the next starts.
  jax.block_until_ready(starts)
  # The CG steps and the objective, per candidate, on the device that holds it: a
  # single-device program each (see _batched_coupling_stage for why). Each process runs only
  # its own (addressable) candidates; the small per-candidate results are then gathered.
  by_device = {}
  for arr in (stacked, cy, *starts):
    for shard in arr.addressable_shards:
      by_device.setdefault(shard.device, []).append(shard)
  out_blocks: dict[Any, list] = {}
  for device, (cx_s, cy_s, *start_s) in by_device.items():
    start = cx_s.index[0].start or 0
    values = []
    for j in range(cx_s.data.shape[0]):
      if start + j >= k:  # Padding: a placeholder, dropped below.
        values.append((jnp.zeros((), opts.dtype), jnp.array(False), jnp.array(0, jnp.int32)))
        continue
      stage = CouplingStage(*(s.data[j] for s in start_s))
      values.append(_cg_stage_jit(cx_s.data[j], cy_s.data, stage, opts))
    out_blocks[device] = [jax.device_put(jnp.stack([v[f] for v in values]), device)
                          for f in range(3)]
  jax.block_until_ready(list(out_blocks.values()))
  gws, conv, its = (parallel.gather_to_host(_global({d: b[f] for d, b in out_blocks.items()},
                                                    (padded,), by_candidate))
                    for f in range(3))
  return [_result(gws[i], conv[i], its[i], unit, opts) for i in range(k)]


def _global(per_device: dict, shape: tuple[int, ...], sharding) -> jax.Array:
  """One global array from this process's per-device pieces (each already on its device)."""
  return jax.make_array_from_single_device_arrays(shape, sharding, list(per_device.values()))


# ----------------------------------------------------------------------------------------------
# Large n: low-rank GW on factored costs, nothing n×n.

# Distances whose n×n matrix is an exact low-rank product: 1 − cos = [x̂, 1] · [−x̂, 1]ᵀ.
FACTORED_DISTANCES = ("cosine",)


@jax.tree_util.register_pytree_node_class
class _FactoredCost(low_rank.LRCGeometry):
  """ott's LRCGeometry whose largest entry is found in row blocks, never as an n×n matrix.

  ott's k-means initializer rescales the cost by its maximum ("max_cost"); LRCGeometry computes
  it with a helper that fails on current jax. Same value: the max of cost_1 cost_2ᵀ (+ bias),
  2048 rows at a time.
  """

  @property
  def _max_cost_matrix(self) -> jax.Array:
    c1, c2 = self._cost_1, self._cost_2
    block = min(c1.shape[0], 2048)
    pad = -c1.shape[0] % block  # Padding repeats row 0: the maximum is unchanged.
    c1 = jnp.concatenate([c1, jnp.broadcast_to(c1[:1], (pad, c1.shape[1]))])
    blocks = c1.reshape(-1, block, c1.shape[1])
    return jnp.max(jax.lax.map(lambda b: jnp.max(b @ c2.T), blocks)) + self._bias


def _cosine_factors(x: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(A, B), n × (d+1) each, with A Bᵀ = (1 − x̂ x̂ᵀ) / scale (diagonal: 0 up to round-off)."""
  xn = linalg.unit_rows(x)
  ones = jnp.ones((x.shape[0], 1), x.dtype)
  return jnp.concatenate([xn, ones], axis=1) / scale, jnp.concatenate([-xn, ones], axis=1)


def sampled_median_distance(x, distance: str = "cosine", pairs: int = 1_000_000,
                            seed: int = 0) -> float:
  """Median of the off-diagonal distances of the rows of ``x``, without the n×n matrix.

  Exact (all n(n−1)/2 pairs) when that is at most ``pairs``; otherwise the median of ``pairs``
  random pairs i ≠ j (seeded), whose error is O(1/√pairs) in quantile: ≈ 1e-3 for the default.
  """
  if distance not in FACTORED_DISTANCES:
    raise ValueError(f"large-n GW supports distance {', '.join(FACTORED_DISTANCES)}, got "
                     f"{distance!r} (its n×n matrix is not a low-rank product)")
  x = np.asarray(x, np.float32)
  n = x.shape[0]
  if n * (n - 1) // 2 <= pairs:
    i, j = np.triu_indices(n, k=1)
  else:
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # Uniform over j ≠ i.
  xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
  d = np.empty(len(i), np.float64)
  for s in range(0, len(i), 1 << 20):  # Bounded temporaries: 2^20 pairs × d at a time.
    sl = slice(s, s + (1 << 20))
    d[sl] = np.clip(1.0 - np.einsum("ij,ij->i", xn[i[sl]], xn[j[sl]]), 0.0, 2.0)
  return float(np.median(d))


def _factored_objective(a, b, c, e, q, r, g) -> jax.Array:
  """GW objective of π = Q diag(1/g) Rᵀ for cx = A Bᵀ, cy = C Eᵀ, in O(n (d² + r d)).

  As ``gw_objective``: pᵀ(cx∘cx)p + qᵀ(cy∘cy)q − 2⟨cx π cy, π⟩, where for a rank-(d+1) cx,
  pᵀ(cx∘cx)p = Σ_ik p_i p_k (a_i·b_k)² = ⟨Aᵀ diag(p) A, Bᵀ diag(p) B⟩.
  """
  mm = linalg.mm
  # Row and column sums of π (exactly, not assuming the solver's Qᵀ1 = Rᵀ1 = g).
  p, qm = mm(q / g, r.sum(axis=0)), mm(r / g, q.sum(axis=0))
  quad_x = jnp.sum(mm(a.T * p, a) * mm(b.T * p, b))
  quad_y = jnp.sum(mm(c.T * qm, c) * mm(e.T * qm, e))
  k = mm(mm(b.T, q) / g, mm(r.T, c))             # Bᵀ π C, (d_x+1) × (d_y+1)
  cross = jnp.sum(k * mm(mm(a.T, q) / g, mm(r.T, e)))  # ⟨A K Eᵀ, π⟩
  return quad_x + quad_y - 2.0 * cross


@functools.partial(jax.jit, static_argnames=("rank", "iterations", "seed"))
def _factored_lowrank(x, y, sx, sy, epsilon, gamma, rank: int, iterations: int, seed: int):
  a, b = _cosine_factors(x, sx)
  c, e = _cosine_factors(y, sy)
  prob = quadratic_problem.QuadraticProblem(_FactoredCost(a, b), _FactoredCost(c, e))
  solver = ott_gw_lr.LRGromovWasserstein(
      rank=rank, epsilon=epsilon, gamma=gamma,
      initializer=initializers_lr.GeneralizedKMeansInitializer(rank=rank),
      min_iterations=min(iterations, 50), max_iterations=iterations, inner_iterations=10)
  out = solver(prob, rng=jax.random.key(seed))
  value = _factored_objective(a, b, c, e, out.q, out.r, out.g)
  return value, out.converged, jnp.asarray(out.n_iters, jnp.int32)


def lowrank_gw_large(x, y, *, options: LowRankOptions = LowRankOptions(),
                     distance: str = "cosine", median_pairs: int = 1_000_000, seed: int = 0,
                     devices=None) -> GWResult:
  """Low-rank GW for n too large for n×n matrices (n = 50,000 and up): memory O(n (d + r)).

  The same problem as ``gw_distance(..., options=options, distance="cosine")`` (median scale
  alignment, ott-jax low-rank GW, k-means initialization), but the cosine cost matrices are
  never formed: they are passed to ott as exact rank-(d+1) factors, the medians come from
  ``sampled_median_distance`` (exact up to ``median_pairs`` pairs) and the reported objective
  is evaluated from the coupling's factors. Rows (samples) are split over ``devices``
  (default: every device of every host) on a 1-D ``samples`` mesh, so the factors and the
  coupling's factors of one large problem are sharded; XLA partitions the solver's products.
  It runs in float32: ``options.precision`` must be "auto" or "float32".

  Returns:
    A ``GWResult`` as ``gw_distance``'s (``solver`` "lowrank"; ``unit`` the sampled median).
  """
  if not isinstance(options, LowRankOptions):
    raise TypeError(f"lowrank_gw_large takes LowRankOptions, got {options!r}")
  if options.dtype != np.float32:
    raise ValueError(f"lowrank_gw_large runs in float32; LowRankOptions.precision must be auto "
                     f"or float32, got {options.precision!r}")
  x, y = checks.check_pair(x, y, "x", "y")
  mx = sampled_median_distance(x, distance, median_pairs, seed)
  my = sampled_median_distance(y, distance, median_pairs, seed + 1)
  for name, m in (("x", mx), ("y", my)):
    if not m > 0:
      raise _zero_median_error(name)
  devices = list(jax.devices() if devices is None else devices)
  n = x.shape[0]
  # Rows are split only when they divide evenly; otherwise one device holds the problem.
  mesh = parallel.make_mesh("samples:-1", devices if n % len(devices) == 0 else devices[:1])
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("samples", None))
  put = lambda v: jax.make_array_from_callback(v.shape, rows, lambda idx: v[idx])
  gw, conv, iters = _factored_lowrank(
      put(x.astype(np.float32)), put(y.astype(np.float32)), jnp.float32(mx), jnp.float32(my),
      jnp.float32(options.epsilon), jnp.float32(options.gamma), options.rank,
      options.iterations, seed)
  return _result(gw, conv, iters, my, options)
