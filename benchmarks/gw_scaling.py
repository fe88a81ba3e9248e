r"""How GW time and peak memory grow with n and with the number of candidates; large n.

  python benchmarks/gw_scaling.py --mode=n --sizes=250,500,1000,2000       # dense, default solver
  python benchmarks/gw_scaling.py --mode=candidates --n=500 --counts=1,2,4,8,16
  python benchmarks/gw_scaling.py --mode=large_dense --n=10000             # dense n×n at n = 10k
  python benchmarks/gw_scaling.py --mode=large_lowrank --sizes=50000       # factored low-rank
  python benchmarks/gw_scaling.py --mode=agreement --n=1000                # low-rank vs dense

Every configuration runs in a fresh subprocess, so its peak resident memory (VmHWM, which
includes JAX/XLA's own ~0.5 GB) is its own. Times are wall-clock: the first call (with jit
compilation, as the score binary pays once per shape) and, for ``n`` and ``candidates``, a
second, warm call (the solve alone), on the machine's CPU devices.
Inputs: the synthetic pool (vlmsel_jax.scoring.synthetic; candidate ``warp_1.5_noise_0.3`` unless
stated) against its text view.

``agreement`` scores the 12 pool candidates with dense GW (default solver, angular and cosine)
and with factored low-rank GW (cosine), and reports the Spearman correlation of the orderings
and the per-candidate ratio low-rank / dense: low-rank values are upper bounds, so what can
agree is the ranking, which is what selection uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CANDIDATE = "warp_1.5_noise_0.3"


def _peak_rss_gib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def _one(config: dict) -> dict:
  """Runs one configuration in this process; returns its numbers."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.scoring import synthetic  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.scores import gw  # pylint: disable=g-import-not-at-top
  pool = synthetic.make_pool(n=config["n"], seed=0)
  idx = pool.names.index(CANDIDATE)
  flag_values = dict(config.get("opts", {}))  # --gw_* flag values, as the score binary's.
  dense = gw.options_from_flags(flag_values.pop("gw_solver", "annealed"), **flag_values)
  lowrank = gw.options_from_flags("lowrank", **flag_values)

  def work():
    if config["kind"] == "dense":
      return gw.gw_distances([pool.candidates[(idx + i) % len(pool.names)]
                              for i in range(config.get("k", 1))], pool.text, options=dense)
    if config["kind"] == "lowrank":
      return [gw.lowrank_gw_large(pool.candidates[idx], pool.text, options=lowrank)]
    return {"dense_angular": gw.gw_distances(pool.candidates, pool.text),
            "dense_cosine": gw.gw_distances(pool.candidates, pool.text, distance="cosine"),
            "lowrank_cosine": [gw.lowrank_gw_large(x, pool.text, options=lowrank)
                               for x in pool.candidates]}

  def rows(res):  # Plain data for the JSON line this subprocess prints.
    return [{"gw": r.value, "converged": r.converged, "iterations": r.iterations} for r in res]

  t = time.perf_counter()
  res = work()
  secs = time.perf_counter() - t
  warm = None
  if config.get("warm"):  # A second, compiled call: the solve alone.
    t = time.perf_counter()
    work()
    warm = round(time.perf_counter() - t, 2)
  return {"config": config, "seconds": round(secs, 2), "warm_seconds": warm,
          "peak_rss_gib": round(_peak_rss_gib(), 2),
          "devices": f"{jax.device_count()} × {jax.devices()[0].platform}",
          "result": {k: rows(v) for k, v in res.items()} if isinstance(res, dict) else rows(res),
          "names": pool.names}


def _spawn(config: dict) -> dict:
  out = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)],
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"configuration {config} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _spearman(a, b) -> float:
  import scipy.stats  # pylint: disable=g-import-not-at-top
  return float(scipy.stats.spearmanr(a, b).statistic)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=["n", "candidates", "large_dense", "large_lowrank",
                                         "agreement"], default="n")
  parser.add_argument("--sizes", default="250,500,1000,2000")
  parser.add_argument("--counts", default="1,2,4,8,16")
  parser.add_argument("--n", type=int, default=500)
  parser.add_argument("--rank", type=int, default=32)
  parser.add_argument("--opts", default="{}", help="JSON of score-binary --gw_* flag values "
                      "(gw.options_from_flags; e.g. {\"gw_iterations\": 5} or "
                      "{\"gw_lowrank_iterations\": 50} for a memory-only run at large n).")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(_one(json.loads(args.one)), default=float))
    return
  extra = json.loads(args.opts)
  print(f"# {platform.machine()} CPU, {os.cpu_count()} cores; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}")
  if args.mode in ("n", "large_dense"):
    sizes = [args.n] if args.mode == "large_dense" else [int(s) for s in args.sizes.split(",")]
    warm = args.mode == "n"
    print("| n | first call s (incl. compile) | warm s | peak RSS GiB | GW | converged | "
          "iterations |\n|---|---|---|---|---|---|---|")
    for n in sizes:
      r = _spawn({"kind": "dense", "n": n, "opts": extra, "warm": warm})
      res = r["result"][0]
      print(f"| {n} | {r['seconds']} | {r['warm_seconds']} | {r['peak_rss_gib']} | "
            f"{res['gw']:.5f} | {res['converged']} | {res['iterations']} |", flush=True)
  elif args.mode == "candidates":
    print(f"n = {args.n}\n| candidates | first call s | warm s | warm s / candidate | "
          "peak RSS GiB |\n|---|---|---|---|---|")
    for k in (int(c) for c in args.counts.split(",")):
      r = _spawn({"kind": "dense", "n": args.n, "k": k, "opts": extra, "warm": True})
      print(f"| {k} | {r['seconds']} | {r['warm_seconds']} | {r['warm_seconds'] / k:.2f} | "
            f"{r['peak_rss_gib']} |", flush=True)
  elif args.mode == "large_lowrank":
    print("| n | rank | seconds | peak RSS GiB | GW (low-rank) | converged |\n"
          "|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
      r = _spawn({"kind": "lowrank", "n": n, "opts": {"gw_rank": args.rank, **extra}})
      res = r["result"][0]
      print(f"| {n} | {args.rank} | {r['seconds']} | {r['peak_rss_gib']} | {res['gw']:.5f} | "
            f"{res['converged']} |", flush=True)
  else:
    r = _spawn({"kind": "agreement", "n": args.n, "opts": {"gw_rank": args.rank, **extra}})
    res = r["result"]
    vals = {k: [v["gw"] for v in res[k]] for k in res}
    print(f"n = {args.n}, rank {args.rank}, {r['seconds']} s, peak RSS {r['peak_rss_gib']} GiB")
    print("| candidate | dense angular | dense cosine | low-rank cosine | low-rank / dense cosine |"
          "\n|---|---|---|---|---|")
    for i, name in enumerate(r["names"]):
      print(f"| {name} | {vals['dense_angular'][i]:.5f} | {vals['dense_cosine'][i]:.5f} | "
            f"{vals['lowrank_cosine'][i]:.5f} | "
            f"{vals['lowrank_cosine'][i] / vals['dense_cosine'][i]:.2f} |")
    print(f"Spearman(low-rank cosine, dense cosine) = "
          f"{_spearman(vals['lowrank_cosine'], vals['dense_cosine']):.3f}; "
          f"Spearman(low-rank cosine, dense angular) = "
          f"{_spearman(vals['lowrank_cosine'], vals['dense_angular']):.3f}")


if __name__ == "__main__":
  main()
