"""Mordal live mode: the search's ``train(candidate, fraction)`` drives real VLM training.

A data fraction r of a candidate is ``round(r · full_steps)`` training steps of the recipe in the
base ``TrainConfig`` (one epoch of the seeded shuffle over r of it sees the first r of the
permutation, which is what ``--data_fraction`` selects). Each candidate trains in its own workdir
and the cosine schedule always spans ``full_steps``, so training it further continues the same
run from its checkpoint — exactly the run a direct full-budget training would have been up to
that step. Cost is counted in training steps; taking a candidate from r1 to r2 costs the steps in
between. After each call the candidate's held-out VQA accuracy is measured on ``eval_limit``
questions, and every (candidate, fraction, accuracy, cost) is kept so the search can be replayed
from the recorded curves (``curves_csv``). With a ``progress.Progress``, each call prints a line
as it finishes (how many calls the search makes is not known in advance, so it is a count, with
the search's cost so far next to grid search's): ``[3] <vision>+<llm>  fraction 0.25  accuracy
0.4120  steps 160  search cost 480 of grid 16640 steps  (4.1 min; 12 min so far)``, or ``(done
before)`` when the checkpoint already had those steps (a search run again after a kill).
"""

from __future__ import annotations

import dataclasses
import os

from vlmsel_jax.runtime import atomic
from vlmsel_jax import zoo
from vlmsel_jax.selection import mordal
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import loop
from vlmsel_jax.training import progress as progress_lib
from vlmsel_jax.zoo import hub


def _short_name(spec: str) -> str:
  """A local path's last component (a ``.gguf`` file without its extension); a zoo name or a Hub
  id (``org/name``) as given. Variants stay: ``/m/vit@layer=-2`` → ``vit@layer=-2``."""
  spec = spec.strip().rstrip("/")
  if hub.is_repo_id(spec.partition("@")[0]) and not os.path.exists(os.path.expanduser(spec)):
    return spec
  name = os.path.basename(spec) or spec
  return name[:-len(".gguf")] if name.lower().endswith(".gguf") else name


def candidate_name(vision: str, llm: str) -> str:
  return f"{_short_name(vision)}+{_short_name(llm)}"


def workdir_of(workdir: str, candidate: str) -> str:
  """The candidate's own training directory (a Hub id's '/' is not a directory level)."""
  return os.path.join(workdir, zoo.file_stem(candidate))


def parse_candidates(entries: list[str]) -> dict[tuple[str, str], str]:
  """``["vision|llm", ...]`` → {(vision, llm): name}."""
  out: dict[tuple[str, str], str] = {}
  for entry in entries:
    vision, sep, llm = entry.partition("|")
    if not sep or not vision.strip() or not llm.strip():
      raise mordal.MordalError(f"--mordal_candidates entry {entry!r} is not vision|llm")
    key = (vision.strip(), llm.strip())
    if key in out:
      raise mordal.MordalError(f"--mordal_candidates lists {entry!r} twice")
    out[key] = candidate_name(*key)
  if len(set(out.values())) != len(out):
    raise mordal.MordalError("--mordal_candidates: two candidates get the same name; use "
                             "distinct model paths")
  return out


class LiveTrainer:
  """``train(candidate, fraction) -> (accuracy, cumulative steps)`` over real training runs."""

  def __init__(self, base: loop.TrainConfig, candidates: dict[tuple[str, str], str], *,
               full_steps: int, eval_limit: int | None, eval_batch_size: int = 16,
               progress: progress_lib.Progress | None = None):
    if full_steps < 1:
      raise mordal.MordalError(f"full_steps must be >= 1, got {full_steps}")
    self.base = base
    self.by_name = {name: key for key, name in candidates.items()}
    self.full_steps = full_steps
    self.eval_limit = eval_limit
    self.eval_batch_size = eval_batch_size
    self.records: list[dict] = []
    self.progress = progress
    self.reached: dict[str, int] = {}  # candidate → the most steps trained (its cost so far)

  def config_for(self, candidate: str, steps: int) -> loop.TrainConfig:
    vision, llm = self.by_name[candidate]
    optim = dataclasses.replace(self.base.optim, schedule_steps=self.full_steps)
    return dataclasses.replace(self.base, vision=vision, llm=llm, max_steps=steps, optim=optim,
                               workdir=workdir_of(self.base.workdir, candidate), progress=False)

  def __call__(self, candidate: str, fraction: float) -> tuple[float, float]:
    if candidate not in self.by_name:
      raise mordal.MordalError(f"unknown candidate {candidate!r}")
    steps = max(1, round(fraction * self.full_steps))
    config = self.config_for(candidate, steps)
    built = loop.build_model(config)
    summary = loop.train(config, built=built)
    result = evaluate_run.evaluate(config, built=built, metrics=("vqa",), limit=self.eval_limit,
                                   batch_size=self.eval_batch_size, progress=False)
    accuracy = float(result["vqa_accuracy"])
    vision, llm = self.by_name[candidate]
    self.records.append({"candidate": candidate, "vision": vision, "llm": llm,
                         "data_fraction": fraction, "accuracy": accuracy, "cost": float(steps)})
    self.reached[candidate] = max(self.reached.get(candidate, 0), steps)
    if self.progress is not None:
      grid = len(self.by_name) * self.full_steps
      fields = [candidate, f"fraction {fraction:g}", f"accuracy {accuracy:.4f}", f"steps {steps}",
                f"search cost {sum(self.reached.values())} of grid {grid} steps"]
      if summary.get("resumed_from", 0) >= steps:  # Trained this far before: evaluated only.
        self.progress.done_before(fields)
      else:
        self.progress.done(fields)
    return accuracy, float(steps)

  def curves_csv(self) -> str:
    """What was trained, in the replay table's format (columns of ``--curves``)."""
    rows, seen = [], set()
    for row in self.records:
      key = (row["candidate"], row["data_fraction"])
      if key not in seen:
        seen.add(key)
        rows.append(row)
    return atomic.csv_text(rows, ["candidate", "vision", "llm", "data_fraction", "accuracy",
                                  "cost"])


def live_payload(result: mordal.MordalResult, trainer: LiveTrainer,
                 config: mordal.MordalConfig, inputs: dict) -> dict:
  n = len(trainer.by_name)
  grid_cost = float(n * trainer.full_steps)
  return {
      "mode": "live",
      **mordal.result_fields(result, config, grid_cost),
      # Without training every candidate fully there is no ground truth to correlate with; replay
      # the recorded curves after a grid run to get weighted τ.
      "weighted_tau": None,
      "candidates": n,
      "full_steps": trainer.full_steps,
      "inputs": inputs,
  }


def live_markdown(p: dict) -> str:
  lines = ["# Mordal search (live: real training runs)", "",
           f"Cost is training steps (a full run is {p['full_steps']} steps); checkpoints are "
           "continued, never restarted.", "", "| | value |", "|---|---|",
           f"| predicted best | **{p['top1']}** |",
           f"| search cost (steps) | {p['cost']:g} |",
           f"| grid-search cost (steps) | {p['grid_cost']:g} |",
           f"| grid / search cost | **{p['cost_ratio']:.2f}×** |",
           f"| candidates trained (any fraction) | {p['trained_candidates']} of "
           f"{p['candidates']} |", "", "## Ranking", "", "| # | candidate | estimate | measured |",
           "|---|---|---|---|"]
  for i, c in enumerate(p["ranking"]):
    est = p["estimates"].get(c)
    measured = ", ".join(f"{float(r):g}: {a:.3f}" for r, a in p["trained"].get(c, {}).items())
    lines.append(f"| {i + 1} | {c} | {'—' if est is None else f'{est:.3f}'} | {measured or '—'} |")
  return "\n".join(lines) + "\n"
