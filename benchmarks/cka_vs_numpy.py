r"""Our CKA family vs NumPy references, side by side in one process: time and value.

  python benchmarks/cka_vs_numpy.py                          # n = 1000, 2000, 4000; stream 10⁶
  python benchmarks/cka_vs_numpy.py --sizes=1000 --stream_n=100000

References (float64 NumPy, transcribed from the Kornblith et al. reference code,
google-research/representation_similarity): ``cka(gram_linear(x), gram_linear(y))``,
``feature_space_linear_cka`` (the reference's own fast path), ``cka(..., debiased=True)`` and
``gram_rbf(x, 0.5)``. Features: x (n × 768) and y = x W + noise (n × 576), so the values are
far from 0 and 1. Ours run in float32 (jit-compiled; times exclude the first call's
compilation, reported once). Ratios are NumPy time / our time (> 1 = we are faster).

The streaming part scores ``--stream_n`` samples (default 10⁶) in minibatches of ``--batch``
rows with ``cka.streaming_minibatch_cka``, never forming more than one batch's m × m Gram
matrix, against a NumPy loop computing the same unbiased HSIC per batch, and against the
closed-form population CKA of the generating model (x ~ N(0, I), y = x W + ε:
||W||² / (||I|| ||WᵀW + I||), Frobenius norms).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
import timing

from vlmsel_jax.scores import cka


def ref_center_gram(gram, unbiased=False):
  gram = gram.astype(np.float64, copy=True)
  n = gram.shape[0]
  if unbiased:
    np.fill_diagonal(gram, 0)
    means = np.sum(gram, 0) / (n - 2)
    means -= np.sum(means) / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    np.fill_diagonal(gram, 0)
  else:
    means = np.mean(gram, 0)
    means -= np.mean(means) / 2
    gram -= means[:, None]
    gram -= means[None, :]
  return gram


def ref_cka(gram_x, gram_y, debiased=False):
  gram_x = ref_center_gram(gram_x, unbiased=debiased)
  gram_y = ref_center_gram(gram_y, unbiased=debiased)
  return gram_x.ravel() @ gram_y.ravel() / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))


def ref_gram_rbf(x, threshold):
  dot = x @ x.T
  sq = np.diag(dot)
  d2 = -2 * dot + sq[:, None] + sq[None, :]
  return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


def ref_feature_space_linear_cka(x, y):
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def ref_batch_hsic(x, y):
  """Unbiased HSIC terms (xy, xx, yy) of one batch, float64, Song et al. (2012)."""
  n = x.shape[0]

  def hsic(k, l):
    k1, l1 = k.sum(1), l.sum(1)
    return (np.sum(k * l) + k1.sum() * l1.sum() / ((n - 1) * (n - 2))
            - 2 / (n - 2) * k1 @ l1) / (n * (n - 3))

  k, l = x @ x.T, y @ y.T
  np.fill_diagonal(k, 0)
  np.fill_diagonal(l, 0)
  return np.array([hsic(k, l), hsic(k, k), hsic(l, l)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1000,2000,4000")
  parser.add_argument("--stream_n", type=int, default=1_000_000)
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"# {platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"{jax.device_count()} × {jax.devices()[0].platform}")
  rng = np.random.default_rng(0)
  w = rng.standard_normal((768, 576)) / np.sqrt(768)
  print("| n | score | NumPy s | ours s | NumPy / ours | |value diff| |\n|---|---|---|---|---|---|")
  for n in (int(s) for s in args.sizes.split(",")):
    x = rng.standard_normal((n, 768))
    y = x @ w + rng.standard_normal((n, 576))
    xf, yf = x.astype(np.float32), y.astype(np.float32)
    cases = [
        ("linear (vs gram reference)", lambda: ref_cka(x @ x.T, y @ y.T),
         lambda: cka.linear_cka(xf, yf)),
        ("linear (vs feature-space reference)", lambda: ref_feature_space_linear_cka(x, y),
         lambda: cka.linear_cka(xf, yf)),
        ("debiased linear", lambda: ref_cka(x @ x.T, y @ y.T, debiased=True),
         lambda: cka.debiased_linear_cka(xf, yf)),
        ("rbf σ=0.5", lambda: ref_cka(ref_gram_rbf(x, 0.5), ref_gram_rbf(y, 0.5)),
         lambda: cka.rbf_cka(xf, yf, 0.5)),
    ]
    for name, ref, ours in cases:
      want, ref_s = timing.best_of(ref, args.repeats)
      ours()  # Compile.
      got, ours_s = timing.best_of(ours, args.repeats)
      print(f"| {n} | {name} | {ref_s:.3f} | {ours_s:.3f} | {ref_s / ours_s:.2f}× | "
            f"{abs(got - want):.1e} |", flush=True)

  # Streaming minibatch CKA over stream_n samples.
  m, dx, dy = args.batch, 64, 48
  w = np.random.default_rng(1).standard_normal((dx, dy))
  population = np.linalg.norm(w) ** 2 / (np.sqrt(dx) * np.linalg.norm(w.T @ w + np.eye(dy)))
  num = args.stream_n // m

  def stream(dtype):
    g = np.random.default_rng(2)
    for _ in range(num):
      xb = g.standard_normal((m, dx))
      yield xb.astype(dtype), (xb @ w + g.standard_normal((m, dy))).astype(dtype)

  t = time.perf_counter()
  for _ in stream(np.float32):
    pass
  gen_s = time.perf_counter() - t
  t = time.perf_counter()
  got = cka.streaming_minibatch_cka(stream(np.float32))
  ours_s = time.perf_counter() - t - gen_s
  t = time.perf_counter()
  total = sum(ref_batch_hsic(xb, yb) for xb, yb in stream(np.float64))
  want = total[0] / np.sqrt(total[1] * total[2])
  ref_s = time.perf_counter() - t - gen_s
  print(f"\nStreaming minibatch CKA, {num * m:,} samples in batches of {m} (x {dx}-d, y {dy}-d; "
        f"data generation, {gen_s:.1f} s, subtracted from both):\n"
        f"| NumPy loop s | ours s | NumPy / ours | ours | NumPy | population |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {ref_s:.1f} | {ours_s:.1f} | {ref_s / ours_s:.2f}× | {got:.5f} | {want:.5f} | "
        f"{population:.5f} |")


if __name__ == "__main__":
  main()
