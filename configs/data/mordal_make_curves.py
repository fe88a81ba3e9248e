r"""Writes the SYNTHETIC replay tables of configs/mordal_replay.flags (no training was run).

  python configs/data/mordal_make_curves.py   # → configs/data/mordal_{curves,vision_cka,llm_cka}.csv

These tables stand in for learning curves of our own VLM trainings until ``vlmsel_jax.train``
produces them. Nothing here was trained: 6 vision encoders in 3 families × 4 LLMs in 2 families
= 24 candidates; each candidate's full-data accuracy is a family effect plus a per-model effect
plus an interaction; its curve follows a power law in the data fraction r,
error(r) = error(1) · r^(−β) with β ~ U(0.1, 0.25) per candidate, plus measurement noise of ±0.003; its
cumulative cost is r × (encoder cost + LLM cost), in GPU-hours. CKA matrices are high within a
family and low across. Seeded, so the files are reproducible byte for byte.
"""

from __future__ import annotations

import csv
import os

import numpy as np

FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
VISION = {"clip-b16": 0, "clip-l14": 0, "siglip-b16": 1, "siglip-so400m": 1, "dinov2-b14": 2,
          "dinov2-l14": 2}
VISION_COST = {"clip-b16": 2.0, "clip-l14": 5.0, "siglip-b16": 2.5, "siglip-so400m": 6.0,
               "dinov2-b14": 2.0, "dinov2-l14": 5.0}
LLM = {"qwen2-0.5b": 0, "qwen2-1.5b": 0, "llama3-1b": 1, "llama3-3b": 1}
LLM_COST = {"qwen2-0.5b": 10.0, "qwen2-1.5b": 25.0, "llama3-1b": 18.0, "llama3-3b": 45.0}


def _cka(families: dict[str, int], within: float, across: float, rng) -> np.ndarray:
  names = list(families)
  n = len(names)
  m = np.eye(n)
  for i in range(n):
    for j in range(i + 1, n):
      base = within if families[names[i]] == families[names[j]] else across
      m[i, j] = m[j, i] = round(base + rng.uniform(-0.05, 0.05), 4)
  return m


def _write_matrix(path: str, names: list[str], m: np.ndarray):
  with open(path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["name"] + names)
    for name, row in zip(names, m):
      w.writerow([name] + [f"{v:.4f}" for v in row])


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  rng = np.random.default_rng(20260)
  vfam = {0: 0.05, 1: 0.08, 2: 0.0}
  lfam = {0: 0.0, 1: 0.03}
  vmodel = {v: rng.normal(0, 0.015) for v in VISION}
  lmodel = {l: rng.normal(0, 0.015) for l in LLM}
  rows = []
  for v, vf in VISION.items():
    for l, lf in LLM.items():
      full = 0.55 + vfam[vf] + lfam[lf] + vmodel[v] + lmodel[l] + rng.normal(0, 0.01)
      beta = rng.uniform(0.1, 0.25)
      for r in FRACTIONS:
        acc = 1.0 - (1.0 - full) * r ** (-beta) + (rng.uniform(-0.003, 0.003) if r < 1 else 0.0)
        cost = r * (VISION_COST[v] + LLM_COST[l])
        rows.append([f"{v}+{l}", v, l, repr(r), f"{acc:.4f}", f"{cost:.4f}"])
  with open(os.path.join(here, "mordal_curves.csv"), "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["candidate", "vision", "llm", "data_fraction", "accuracy", "cost"])
    w.writerows(rows)
  _write_matrix(os.path.join(here, "mordal_vision_cka.csv"), list(VISION),
                _cka(VISION, 0.85, 0.2, rng))
  _write_matrix(os.path.join(here, "mordal_llm_cka.csv"), list(LLM), _cka(LLM, 0.9, 0.1, rng))


if __name__ == "__main__":
  main()
