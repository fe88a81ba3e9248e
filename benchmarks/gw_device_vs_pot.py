r"""The device-only GW path (auction oracle) vs POT CG and vs the host oracle, in one process.

  python benchmarks/gw_device_vs_pot.py                        # n = 250, 500, 1000, 2000
  python benchmarks/gw_device_vs_pot.py --sizes=250,500 --candidates=5,11 --batch_k=0

The default solver (``annealed``: annealed entropic GW, then a conditional-gradient polish) is
run twice on the same cost matrices, once with each CG oracle: ``host`` (POT's network simplex
through ``jax.pure_callback``, the CPU default) and ``device`` (the ε-scaled auction of
``vlmsel_jax/scores/assignment.py``, no callback). POT's CG (``ot.gromov.gromov_wasserstein2``)
is the reference: ratios are ours / POT CG for the objective (lower = better coupling) and for
the time. Cost matrices: angular distances of a synthetic candidate and of the text view,
scale-aligned as in the score binary (see benchmarks/gw_vs_pot.py), in float64 for POT; ours
run in float32 (their default). "CG its" are the polish's Frank-Wolfe iterations, "rounds" the
auction's bidding rounds summed over them (each round reads at most 16 rows of the gradient,
a few O(n) passes: on an accelerator the rounds, not the flops, set the time). Our times exclude jit compilation (first call minus
a warm call, reported separately); best of --repeats.

The batch part times one ``gw_distances`` call over --batch_k candidates with each oracle; with
the device oracle that call is a single program (coupling stage and CG steps vmapped or mapped
over the candidates and sharded over the devices), with the host oracle the CG steps run per
candidate after it.
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

ORACLES = ("host", "device")


def _costs64(x, y):
  with jax.enable_x64(True):
    cx, cy, unit = gw.prepare_costs(np.asarray(x, np.float64), np.asarray(y, np.float64))
    return np.asarray(cx), np.asarray(cy), float(unit)


def _pot_cg(c1, c2):
  p = np.full(c1.shape[0], 1.0 / c1.shape[0])
  return ot.gromov.gromov_wasserstein2(c1, c2, p, p, "square_loss", max_iter=1000)


def _solve_with_stats(cx, cy, opts: gw.AnnealedOptions):
  """solve_normalized's value, plus the polish's CG iterations and auction rounds."""
  stage = gw.coupling_stage(cx, cy, opts)
  coupling, _, cg_iters, rounds = gw.cg_polish(cx, cy, stage.coupling, opts, prices=stage.prices)
  return gw.gw_objective(cx, cy, coupling), cg_iters, rounds


def _ours(c1, c2, oracle: str, repeats: int):
  opts = gw.AnnealedOptions(oracle=oracle)
  a, b = jnp.asarray(c1, opts.dtype), jnp.asarray(c2, opts.dtype)
  solve = jax.jit(lambda u, v: _solve_with_stats(u, v, opts))
  t = time.perf_counter()
  jax.block_until_ready(solve(a, b))
  first_s = time.perf_counter() - t
  out, secs = timing.best_of(lambda: jax.block_until_ready(solve(a, b)), repeats)
  value, cg_iters, rounds = (np.asarray(v) for v in out)
  return float(value), secs, max(first_s - secs, 0.0), int(cg_iters), int(rounds)


def run_size(n: int, candidate: int, repeats: int, seed: int):
  pool = synthetic.make_pool(n=n, seed=seed)
  c1, c2, unit = _costs64(pool.candidates[candidate], pool.text)
  ref, ref_s = timing.best_of(lambda: _pot_cg(c1, c2), repeats)
  rows = [("POT CG (reference)", ref, ref_s, 0.0, None, None)]
  for oracle in ORACLES:
    rows.append((f"ours annealed, {oracle} oracle", *_ours(c1, c2, oracle, repeats)))
  print(f"\nn = {n}, candidate {candidate} '{pool.names[candidate]}' (GW in units of "
        f"median(D^Y)², median(D^Y) = {unit:.3f} rad)")
  print(f"{'solver':30s} {'GW objective':>13s} {'÷ POT CG':>9s} {'seconds':>8s} "
        f"{'÷ POT CG':>9s} {'compile s':>9s} {'CG its':>6s} {'rounds':>7s}")
  for name, val, secs, comp, its, rounds in rows:
    extra = "" if its is None else f" {its:6d} {rounds:7d}"
    print(f"{name:30s} {val:13.5f} {val / ref:9.4f} {secs:8.2f} {secs / ref_s:9.2f} "
          f"{comp:9.1f}{extra}", flush=True)
  return rows


def run_batch(n: int, k: int, seed: int, mode: str):
  pool = synthetic.make_pool(n=n, seed=seed)
  cands = [pool.candidates[i % len(pool.candidates)] for i in range(k)]
  print(f"\nbatched: {k} candidates, n = {n}, one gw_distances call, batch_mode={mode}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  values = {}
  for oracle in ORACLES:
    opts = gw.AnnealedOptions(oracle=oracle)
    gw.gw_distances(cands, pool.text, options=opts, batch_mode=mode)  # Compile.
    t = time.perf_counter()
    values[oracle] = np.array([r.value for r in gw.gw_distances(cands, pool.text, options=opts,
                                                                batch_mode=mode)])
    print(f"  {oracle:6s} oracle: {time.perf_counter() - t:7.2f} s   mean GW "
          f"{values[oracle].mean():.5f}", flush=True)
  ratio = values["device"] / values["host"]
  print(f"  device ÷ host objective: min {ratio.min():.4f}, max {ratio.max():.4f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="250,500,1000,2000")
  parser.add_argument("--candidates", default="5",
                      help="indices into the synthetic pool (5 = warp + noise, 11 = random)")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_k", type=int, default=8)
  parser.add_argument("--batch_n", type=int, default=250)
  parser.add_argument("--batch_mode", default="auto", help="gw_distances batch mode")
  args = parser.parse_args()
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}; jax {jax.__version__} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); POT {ot.__version__}")
  for n in (int(s) for s in args.sizes.split(",") if s):
    for candidate in (int(c) for c in args.candidates.split(",") if c):
      run_size(n, candidate, args.repeats, args.seed)
  if args.batch_k:
    run_batch(args.batch_n, args.batch_k, args.seed, args.batch_mode)


if __name__ == "__main__":
  main()
