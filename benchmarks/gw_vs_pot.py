r"""Our GW solvers vs POT, side by side in one process: time and GW objective.

  python benchmarks/gw_vs_pot.py                      # n = 250, 500, 1000, 2000; batch of 16
  python benchmarks/gw_vs_pot.py --sizes=250,500 --batch_k=8 --batch_n=250

Cost matrices: angular distances of a synthetic candidate (a damaged, distance-preserving view of
a clustered latent) and of the text view of the same latent (vlmsel_jax.scoring.synthetic), scale-aligned
as in the score binary. Every solver gets the same two matrices; every value printed is the
unregularized GW objective of the solver's coupling (lower = better answer; GW is non-convex).
POT's CG (ot.gromov.gromov_wasserstein2) is the reference: ratios are ours / POT CG.
Our times exclude jit compilation (first call minus a warm call, reported separately); POT has
none. Timings are best of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import ot
import timing

from vlmsel_jax.scoring import synthetic
from vlmsel_jax.scores import gw


def _ours(cx, cy, opts: gw.SolverOptions, repeats: int):
  with jax.enable_x64(opts.dtype == np.float64):
    a = jnp.asarray(cx, opts.dtype)
    b = jnp.asarray(cy, opts.dtype)
    solve = jax.jit(lambda u, v: gw.solve_normalized(u, v, opts))
    t = time.perf_counter()
    jax.block_until_ready(solve(a, b))
    first_s = time.perf_counter() - t
    out, secs = timing.best_of(lambda: jax.block_until_ready(solve(a, b)), repeats)
    return float(out[0]), secs, max(first_s - secs, 0.0)


def _pot_cg(c1, c2, p):
  return ot.gromov.gromov_wasserstein2(c1, c2, p, p, "square_loss", max_iter=1000)


def _pot_entropic(c1, c2, p, eps):
  t = ot.gromov.entropic_gromov_wasserstein(c1, c2, p, p, "square_loss", epsilon=eps,
                                           max_iter=1000, solver="PGD")
  const_c, h1, h2 = ot.gromov.init_matrix(c1, c2, t.sum(1), t.sum(0), "square_loss")
  return float(ot.gromov.gwloss(const_c, h1, h2, t))


OUR_SOLVERS = (
    ("ours annealed (default)", gw.AnnealedOptions()),
    ("ours entropic ε=5e-3", gw.EntropicOptions(epsilon=5e-3, polish=False)),
    ("ours entropic ε=1e-3", gw.EntropicOptions(epsilon=1e-3, polish=False)),
    ("ours cg (float64)", gw.CGOptions()),
    ("ours lowrank r=32", gw.LowRankOptions(rank=32)),
)


def run_size(n: int, candidate: int, repeats: int, seed: int, pot_entropic: bool):
  pool = synthetic.make_pool(n=n, seed=seed)
  with jax.enable_x64(True):
    cx, cy, unit = gw.prepare_costs(np.asarray(pool.candidates[candidate], np.float64),
                                    np.asarray(pool.text, np.float64))
    c1, c2, unit = np.asarray(cx), np.asarray(cy), float(unit)
  p = np.full(n, 1.0 / n)
  rows = []
  ref, ref_s = timing.best_of(lambda: _pot_cg(c1, c2, p), repeats)
  rows.append(("POT CG (reference)", ref, ref_s, 0.0))
  if pot_entropic:
    val, secs = timing.best_of(lambda: _pot_entropic(c1, c2, p, 5e-3), 1)
    rows.append(("POT entropic ε=5e-3", val, secs, 0.0))
  for name, opts in OUR_SOLVERS:
    if isinstance(opts, gw.LowRankOptions) and n < 1000:
      continue
    val, secs, comp = _ours(c1, c2, opts, repeats)
    rows.append((name, val, secs, comp))
  print(f"\nn = {n}  (candidate '{pool.names[candidate]}'; GW in units of median(D^Y)², "
        f"median(D^Y) = {unit:.3f} rad)")
  print(f"{'solver':28s} {'GW objective':>13s} {'÷ POT CG':>9s} {'seconds':>8s} "
        f"{'÷ POT CG':>9s} {'compile s':>9s}")
  for name, val, secs, comp in rows:
    print(f"{name:28s} {val:13.5f} {val / ref:9.3f} {secs:8.2f} {secs / ref_s:9.2f} {comp:9.1f}")
  return rows


def run_batch(n: int, k: int, seed: int, mode: str):
  pool = synthetic.make_pool(n=n, seed=seed)
  cands = [pool.candidates[i % len(pool.candidates)] for i in range(k)]
  p = np.full(n, 1.0 / n)
  t = time.perf_counter()
  pot = []
  for x in cands:
    with jax.enable_x64(True):
      cx, cy, unit = gw.prepare_costs(np.asarray(x, np.float64), np.asarray(pool.text, np.float64))
      pot.append(_pot_cg(np.asarray(cx), np.asarray(cy), p) * float(unit) ** 2)
  pot_s = time.perf_counter() - t
  gw.gw_distances(cands, pool.text, batch_mode=mode)  # Compile.
  t = time.perf_counter()
  ours = [r.value for r in gw.gw_distances(cands, pool.text, batch_mode=mode)]
  ours_s = time.perf_counter() - t
  ours, pot = np.array(ours), np.array(pot)
  print(f"\nbatched: {k} candidates, n = {n}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s)")
  print(f"  POT CG loop:          {pot_s:7.2f} s   mean GW {pot.mean():.5f}")
  print(f"  ours gw_distances ({mode}): {ours_s:7.2f} s   mean GW {ours.mean():.5f}   "
        f"speed-up {pot_s / ours_s:.2f}×, objective ≤ POT on {int(np.sum(ours <= pot * 1.005))}/{k}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="250,500,1000,2000")
  parser.add_argument("--candidate", type=int, default=5,
                      help="index into the synthetic pool (5 = warp + noise)")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--batch_k", type=int, default=16)
  parser.add_argument("--batch_n", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_modes", default="map,vmap", help="gw_distances batch modes")
  parser.add_argument("--no_pot_entropic", action="store_true")
  args = parser.parse_args()
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"POT {ot.__version__}")
  for n in (int(s) for s in args.sizes.split(",") if s):
    run_size(n, args.candidate, args.repeats, args.seed, not args.no_pot_entropic)
  if args.batch_k:
    for mode in args.batch_modes.split(","):
      run_batch(args.batch_n, args.batch_k, args.seed, mode)


if __name__ == "__main__":
  main()
