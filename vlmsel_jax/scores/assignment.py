"""Linear assignment on the device: Bertsekas' auction algorithm with ε-scaling, no callbacks.

``linear_assignment(cost)`` returns the column assigned to each row by a minimum-cost permutation
of a square matrix; ``auction(cost, ...)`` returns that with the dual prices and diagnostics.
Both are pure jax (``jit``, ``vmap`` and ``shard_map`` apply), so the conditional-gradient steps
of the GW solvers (gw.py, ``oracle="device"``) can run on an accelerator without a host round
trip per iteration.

Algorithm (Bertsekas 1988; Bertsekas & Eckstein 1988), in a block form between Jacobi (every
unassigned row bids at once) and Gauss-Seidel (one row at a time). Rows are persons, columns
objects, benefits a = −(cost − row minima) ∈ [−R, 0]. Each column j has a price p_j. Every
round, each of the first ``bidders`` unassigned rows i bids for its best column
j₁ = argmax_j a_ij − p_j, raising its price to a_ij₁ − v₂ + ε, where v₂ is the row's second-best
value; each column goes to its highest bidder, whose previous owner becomes unassigned. Any
nonempty set of unassigned bidders keeps the algorithm's guarantees. A round reads only its
bidders' rows: O(bidders · n) work and a few O(n) scatters, the same shape every round, which is
what a GPU or TPU runs well. ε-scaling: ε starts at ``eps_start × R`` and is divided by ``theta``
whenever every row holds a column; at each division (one dense O(n²) pass) the rows that violate
ε-complementary slackness for the new ε (a_iσ(i) − p_σ(i) < v₁ − ε) are unassigned and bid
again, the others keep their columns. It stops when every row is assigned at the final
ε = ``tol × R``. Then every row holds a column within ε of its best, so the permutation costs at
most n ε = n · tol · R more than the optimum (ε-complementary slackness); on integer costs with
n · tol · R < 1 it is optimal.

Initial prices: the column reduction p_j = max_i a_ij (every column has a zero reduced cost), or
the caller's prices (a warm start: consecutive CG oracles see nearby matrices, and prices are
per column, so they carry over any change of row constants).

A cap on rounds (``max_rounds``) guards against pathological inputs (NaN, float round-off that
stops prices from rising): rows still unassigned then take the free columns in index order, so
the answer is always a permutation, and ``complete`` says whether the cap was hit.

What was tried, and the numbers that decided (measured on the matrices the CG polish of the
default annealed solver meets: GW gradients of the synthetic benchmark problems, candidates
"warp_1.5_noise_0.3" and "random" at n = 250, 500, 1000 (and 2000 for the bidder bound); CPU,
so the counts are what matters for an accelerator, where a round is launch-bound):

  * At most 16 bidders a round (kept; ``BIDDERS``). The Jacobi form, where every unassigned row
    bids, read the whole n × n matrix every round, yet most rounds have one or a few bidders
    (below). Bounding the bidders left the rounds about the same (the six call sequences at
    n = 500, 1000, 2000: 61,700 rounds with 16 bidders, 56,200 with 32, 58,300 with 64, 61,900
    with all) and made each round O(16 n) instead of O(n²): the whole polish's oracle calls at
    n = 2000 took 1.3 s instead of 46.8 s ("warp", 3 calls) and 3.5 s instead of 135 s
    ("random", 10 calls) on 2 CPU cores, 0.6 s instead of 11.1 s at n = 1000 "random". With
    8 bidders the CPU time fell a little further but the rounds rose (74,000 against 57,400 on
    the four sequences at n ≥ 1000); the optimality gaps were the same (≤ 1.3e-6 relative) for
    every bound.
  * The ε-scaled auction (kept). Its permutations cost the same as SciPy's optimum on every
    gradient tried (relative gap ≤ 5e-7, the bound allows n · 1e-5 · R). The first call of a
    polish, from the column reduction, takes 159 / 1,095 rounds at n = 250 (warp / random),
    1,339 / 2,377 at n = 500 and 2,816 / 4,102 at n = 1,000; the later calls, warm-started from
    the previous prices, take 4 – 121 rounds in all, except on n = 1,000 "random" (7 later
    calls, 5,542 rounds). Most rounds have at most one row unassigned (58% of them on n = 500
    "random": the auction's tail, one displaced row at a time; the bidder bound above makes
    those rounds cheap), which a better start does not remove: 12 settings of the start prices (column reduction or zero), θ (4 – 10) and the
    first ε (R/4 – R/64) gave 10,600 – 23,300 rounds over six first calls, chaotically per
    matrix; the column reduction with θ = 8 from R/64 gave 11,900.
  * Ties spread over columns (row i prefers, among exact ties, the first column at or after
    i): a constant matrix 1,546 → 5 rounds, integer costs in {0, 1, 2} at n = 200 1,650 → 959,
    a rank-one matrix at n = 100 2,163 → 927; the GW gradients unchanged. Kept.
  * Log-domain Sinkhorn first (ε-scaled 1e-2 → 1e-3 R, 20 iterations per ε), its column
    potentials as the auction's start: on first calls at n = 1,000 it cut "random" from 9,756
    to 5,665 iterations (Sinkhorn's included) but raised "warp" from 1,424 to 2,390 (prototype
    counts, ε-scaling from R/50 by 8). Not kept: no consistent gain, and exp per entry.
  * The annealed stage's own dual as the first call's start (kept; gw.py
    ``CouplingStage.prices``): minus twice the column potential of its last Sinkhorn solve
    (ott's linearized square-loss cost is half the GW gradient). Whole polishes of the 12
    synthetic candidates in 7 pools (seeds 0 – 2 at n = 200 and 500, seed 0 at n = 1000; 84
    problems), rounds in all against the cold start's 120,274, and the sum over pools of each
    pool's largest count (what a vmapped batch waits for) against 27,559: first ε = 1e-2 R:
    100,724 (−12% to −26% in every pool) and 26,836 (kept); 3e-3 R: 92,176 but 31,752;
    1e-3 R: more than 3e-3 at n ≤ 500, and 18,332 against 15,766 there. The potentials carry
    the stage's entropic blur: started too fine, a few problems pay for it with long price
    wars. Objectives within 0.07% of the cold start's, either way.
  * Sinkhorn alone, rounded by the row argmax: even after 300 iterations down to ε = 1e-4 R
    the argmax was not a permutation on 3 of the 4 first-call gradients tried (n = 250, 500),
    so it needs an exact completion anyway (the previous item).
  * A coarse first call (tol 1e-3 on the polish's first call, 1e-5 after): 35% fewer rounds,
    but final GW objectives 0.1 – 0.2% above the exact oracle's (n = 500 "warp" 1.0017×,
    n = 1,000 1.0012×). Not kept; at tol 1e-5 the polish's objective equals the host oracle's
    to 1e-4 relative (1.2e-3 on n = 1,000 "random").

Objectives and times of the whole solver against POT's CG and the host oracle:
benchmarks/gw_device_vs_pot.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Defaults, relative to R (the spread of the row-reduced cost matrix).
TOL = 1e-5          # Final ε: the permutation costs at most n · TOL · R above the optimum.
EPS_START = 1 / 64  # First ε of a cold start (column-reduction prices).
THETA = 8.0         # ε is divided by this at each scaling phase.
UNROLL = 4          # Bidding rounds per while-loop iteration (fewer loop-condition syncs).
BIDDERS = 16        # Unassigned rows that bid in one round, at most.


class Assignment(NamedTuple):
  """What ``auction`` returns (a pytree: it can leave ``jit`` and be ``vmap``-ped).

  Attributes:
    cols: (n,) int32, the column of each row; always a permutation of 0..n−1.
    prices: (n,) the final column prices (the dual), to warm-start a nearby problem.
    rounds: bidding rounds run (int32).
    complete: True if the auction finished within ``max_rounds``; False if the rows it had not
      assigned were given the free columns in index order (a permutation, not near-optimal).
  """
  cols: jax.Array
  prices: jax.Array
  rounds: jax.Array
  complete: jax.Array


def column_reduction_prices(cost: jax.Array) -> jax.Array:
  """Cold-start prices: p_j = max_i −(cost_ij − min_k cost_ik)."""
  reduced = cost - jnp.min(cost, axis=1, keepdims=True)
  return -jnp.min(reduced, axis=0)


def default_max_rounds(n: int) -> int:
  """The round cap: far above what the ε-scaled auction needed on any matrix measured."""
  return 200 * n + 10_000


def auction(cost: jax.Array, *, prices: jax.Array | None = None,
            eps_start: float | jax.Array = EPS_START, tol: float | jax.Array = TOL,
            theta: float = THETA, max_rounds: int | None = None,
            unroll: int = UNROLL, bidders: int = BIDDERS) -> Assignment:
  """Minimum-cost permutation of a square matrix by the ε-scaled auction algorithm.

  Args:
    cost: (n, n) float costs (minimised).
    prices: (n,) initial column prices, e.g. ``Assignment.prices`` of a nearby problem; None:
      the column reduction (``column_reduction_prices``).
    eps_start: first ε, relative to R = max of the row-reduced costs (may be traced).
    tol: final ε relative to R (may be traced): the answer costs at most n · tol · R above the
      optimum. Floored at 8 float ulps of R, below which prices could stop rising.
    theta: ε divisor between scaling phases (static).
    max_rounds: cap on bidding rounds (static); None = ``default_max_rounds(n)``.
    unroll: bidding rounds per while-loop iteration (static).
    bidders: at most this many unassigned rows bid in a round (static).

  Returns:
    An ``Assignment``: ``cols`` (the permutation), ``prices``, ``rounds``, ``complete``.
  """
  cost = jnp.asarray(cost)
  if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
    raise ValueError(f"auction needs a square matrix, got shape {cost.shape}")
  if not jnp.issubdtype(cost.dtype, jnp.floating):
    cost = cost.astype(jnp.float32)
  n = cost.shape[0]
  dtype = cost.dtype
  if max_rounds is None:
    max_rounds = default_max_rounds(n)
  if n == 1:
    zero = jnp.zeros((1,), dtype)
    return Assignment(jnp.zeros((1,), jnp.int32), zero if prices is None else prices,
                      jnp.array(0, jnp.int32), jnp.array(True))
  benefit = -(cost - jnp.min(cost, axis=1, keepdims=True))
  spread = -jnp.min(benefit)
  floor = 8 * float(jnp.finfo(dtype).eps)
  # A matrix whose rows are constant: every permutation is optimal; any ε > 0 ends at once.
  scale = jnp.where(spread > 0, spread, jnp.ones((), dtype))
  eps_final = scale * jnp.maximum(jnp.asarray(tol, dtype), floor)
  eps0 = jnp.maximum(scale * jnp.asarray(eps_start, dtype), eps_final)
  if prices is None:
    p0 = -jnp.min(-benefit, axis=0)
  else:
    # Only price differences matter; re-centring keeps warm-started prices near 0, where float
    # steps are fine enough for ε (many warm starts in a row would otherwise let them drift).
    p0 = jnp.asarray(prices, dtype)
    p0 = p0 - jnp.max(p0)
  # Non-finite costs: no sensible answer; stop at once (``complete`` is False) instead of
  # bidding until the cap.
  finite = jnp.all(jnp.isfinite(cost))
  rows = jnp.arange(n, dtype=jnp.int32)
  k = min(n, bidders)
  neg = jnp.array(-jnp.inf, dtype)
  unset = jnp.full((n,), -1, jnp.int32)

  def finished(p2o, eps):
    return jnp.all(p2o >= 0) & (eps <= eps_final)

  def bidding_round(state):
    p, p2o, o2p, eps, rounds = state
    # The first k unassigned rows bid (any nonempty subset of them keeps the auction's
    # guarantees); their k rows of the matrix are all a round reads.
    bidding = p2o < 0
    count = jnp.sum(bidding)
    who = jnp.nonzero(bidding, size=k, fill_value=0)[0].astype(jnp.int32)
    valid = jnp.arange(k) < count
    values = benefit[who] - p[None, :]
    v1 = jnp.max(values, axis=1)
    # Among tied best columns row i takes the first at or after column i (cyclically), so rows
    # with identical preferences bid for different columns instead of all for the first one.
    shift = (rows[None, :] - who[:, None]) % n
    j1 = jnp.argmin(jnp.where(values >= v1[:, None], shift, n), axis=1).astype(jnp.int32)
    v2 = jnp.max(jnp.where(rows[None, :] == j1[:, None], neg, values), axis=1)
    # Each column goes to its highest bidder (lowest row on ties); its owner is unassigned.
    bid = jnp.where(valid, v1 + p[j1] - v2 + eps, neg)
    best = jnp.full((n,), neg).at[j1].max(bid)
    won = best > neg
    winner = jnp.full((n,), n, jnp.int32).at[j1].min(
        jnp.where(valid & (bid == best[j1]), who, n))
    p2o = p2o.at[jnp.where(won & (o2p >= 0), o2p, n)].set(-1, mode="drop")
    p2o = p2o.at[jnp.where(won, winner, n)].set(rows, mode="drop")
    o2p = jnp.where(won, winner, o2p)
    p = jnp.where(won, best, p)
    return p, p2o, o2p, eps, rounds + (count > 0).astype(jnp.int32)

  def bidding_cond(state):
    _, p2o, _, _, rounds = state
    return jnp.any(p2o < 0) & (rounds < max_rounds)

  def bidding_body(state):
    for _ in range(unroll):
      state = bidding_round(state)
    return state

  def phase(state):
    p, p2o, o2p, eps, rounds = state
    # Every row holds a column at the current ε: ε shrinks, and the rows that are no longer
    # ε-happy (a_iσ(i) − p_σ(i) < v₁ − ε) give theirs up. The one dense pass of a phase.
    lower = jnp.all(p2o >= 0) & (eps > eps_final)
    eps = jnp.where(lower, jnp.maximum(eps / theta, eps_final), eps)
    values = benefit - p[None, :]
    v1 = jnp.max(values, axis=1)
    own = jnp.take_along_axis(values, jnp.maximum(p2o, 0)[:, None], axis=1)[:, 0]
    drop = lower & (p2o >= 0) & (own < v1 - eps)
    o2p = o2p.at[jnp.where(drop, p2o, n)].set(-1, mode="drop")
    p2o = jnp.where(drop, -1, p2o)
    # Then bidding rounds until every row holds a column again.
    return jax.lax.while_loop(bidding_cond, bidding_body, (p, p2o, o2p, eps, rounds))

  def phase_cond(state):
    _, p2o, _, eps, rounds = state
    return ~finished(p2o, eps) & (rounds < max_rounds) & finite

  init = (p0, unset, unset, eps0, jnp.array(0, jnp.int32))
  p, p2o, o2p, eps, rounds = jax.lax.while_loop(phase_cond, phase, init)
  complete = finished(p2o, eps) & finite
  # Past the cap: unassigned rows take the free columns in index order.
  unassigned = p2o < 0
  free_first = jnp.argsort(o2p >= 0, stable=True).astype(jnp.int32)
  rank = jnp.cumsum(unassigned.astype(jnp.int32)) - 1
  cols = jnp.where(unassigned, free_first[jnp.clip(rank, 0, n - 1)], p2o)
  return Assignment(cols, p, rounds, complete)


def linear_assignment(cost: jax.Array, **kwargs) -> jax.Array:
  """The column of each row in a minimum-cost permutation (``auction(cost, **kwargs).cols``)."""
  return auction(cost, **kwargs).cols


def permutation_cost(cost, cols) -> float:
  """Σ_i cost[i, cols[i]] in float64 (host helper for tests and benchmarks)."""
  cost, cols = np.asarray(cost, np.float64), np.asarray(cols)
  return float(cost[np.arange(cost.shape[0]), cols].sum())
