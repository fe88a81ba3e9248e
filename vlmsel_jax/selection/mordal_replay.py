"""Mordal replayed on recorded learning curves: the search's ``train(candidate, fraction)`` looks
the recorded (accuracy, cumulative cost) up, so it pays only for what it trains.

The curves (``tables.read_curves``) give every candidate's accuracy at each data fraction and the
cumulative cost of training it that far; fraction 1.0 is the full run, the ground truth the
search's ranking is judged against (weighted τ), and the sum of the full runs' costs is grid
search's cost.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from vlmsel_jax.selection import mordal
from vlmsel_jax.selection import tables


def table_trainer(curves: Mapping[str, Mapping[float, tuple[float, float]]], path: str
                  ) -> mordal.TrainFn:
  """``train(candidate, fraction)`` that looks the recorded (accuracy, cumulative cost) up."""

  def train(candidate: str, fraction: float) -> tuple[float, float]:
    for r, value in curves[candidate].items():
      if math.isclose(r, fraction, rel_tol=1e-9):
        return value
    raise mordal.MordalError(f"{path}: the search needs {candidate!r} at data_fraction "
                             f"{fraction:g}, which the table lacks (has "
                             f"{', '.join(f'{r:g}' for r in sorted(curves[candidate]))})")

  return train


def replay(curves_paths: str | Sequence[str], vision_path: str, llm_specs: Sequence[str],
           config: mordal.MordalConfig) -> dict[str, Any]:
  """Runs the search on the recorded curves (one file or several, one pool), the vision CKA
  matrix at ``vision_path`` and the LLM ones of ``llm_specs`` (``tables.read_llm_similarity``);
  returns the JSON payload."""
  curves_paths = [curves_paths] if isinstance(curves_paths, str) else list(curves_paths)
  if not vision_path:
    raise mordal.MordalError("--vision_similarity is required")
  pairs, curves = tables.read_curves(curves_paths)
  vision_names, vision_sim = tables.read_similarity(vision_path)
  llm = tables.read_llm_similarity(list(llm_specs))
  result = mordal.search(pairs, vision_names, vision_sim, llm,
                         table_trainer(curves, ", ".join(curves_paths)), config)
  full = {c: next(v for r, v in per.items() if math.isclose(r, 1.0)) for c, per in curves.items()}
  truth = {c: acc for c, (acc, _) in full.items()}
  grid_cost = float(sum(cost for _, cost in full.values()))
  best = max(truth, key=lambda c: truth[c])
  return {
      **mordal.result_fields(result, config, grid_cost),
      "weighted_tau": mordal.ranking_weighted_tau(result.ranking, truth),
      "top1_accuracy": truth[result.top1],
      "best": best,
      "best_accuracy": truth[best],
      "top1_regret": truth[best] - truth[result.top1],
      "candidates": len(truth),
      "truth": truth,
      "inputs": {"curves": curves_paths, "vision_similarity": vision_path,
                 "llm_similarity": list(llm_specs)},
  }
