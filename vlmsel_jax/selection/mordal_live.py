"""Mordal live mode: the search's ``train(candidate, fraction)`` drives real VLM training.

The candidates are every encoder with every LLM (``candidate_grid``); ``search_live`` runs the
search with a ``LiveTrainer`` and returns its result with the curves it recorded.

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
before)`` when the call was answered before.

A search killed and run again makes the same calls in the same order, but a candidate's
checkpoint may already be past the fraction a call asks for, and evaluating it would answer for
the wrong fraction. So every answered call is appended to ``<workdir>/mordal_live_calls.jsonl``
(keyed by the full training config of the call) before the next one starts, and a call found
there is answered from it: the search run again retraces the killed one exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlmsel_jax import zoo
from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import parallel
from vlmsel_jax.selection import mordal
from vlmsel_jax.selection import tables
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import loop
from vlmsel_jax.training import progress as progress_lib
from vlmsel_jax.zoo import hub
from vlmsel_jax.zoo import multi


def _short_name(spec: str) -> str:
  """A local path's last component (a ``.gguf`` file without its extension); a zoo name or a Hub
  id (``org/name``) as given. Variants stay: ``/m/vit@layer=-2`` → ``vit@layer=-2``."""
  spec = spec.strip().rstrip("/")
  if hub.is_repo_id(spec.partition("@")[0]) and not os.path.exists(os.path.expanduser(spec)):
    return spec
  name = os.path.basename(spec) or spec
  return name[:-len(".gguf")] if name.lower().endswith(".gguf") else name


def candidate_name(vision: str, llm: str) -> str:
  """``<vision>+<llm>`` of short names; a multi-encoder vision's members are shortened one by one
  and the whole put in parentheses (``zoo.candidate_pair_name``), so the name reads back."""
  if zoo.is_multi(vision):
    return zoo.candidate_pair_name(multi.map_members(vision, _short_name), _short_name(llm))
  return zoo.candidate_pair_name(_short_name(vision), _short_name(llm))


def candidate_config(base: loop.TrainConfig, vision: str, llm: str, **changes
                     ) -> loop.TrainConfig:
  """``base``'s recipe as the run of ``vision`` + ``llm``: the tower layer is the vision spec's own
  ``@layer=``, else ``base``'s (so build ``base`` from a spec that names no layer: its layer is
  then ``--vision_layer``); ``changes`` replace other fields."""
  vlm = dataclasses.replace(base.vlm, vision_layer=loop.tower_layer(vision, base.vlm.vision_layer))
  return dataclasses.replace(base, vision=vision, llm=llm, vlm=vlm, **changes)


def workdir_of(workdir: str, candidate: str) -> str:
  """The candidate's own training directory (a Hub id's '/' is not a directory level)."""
  return os.path.join(workdir, zoo.file_stem(candidate))


def candidate_grid(visions: Sequence[str], llms: Sequence[str]) -> dict[tuple[str, str], str]:
  """Every encoder with every LLM: {(vision, llm): name}, the candidates of a live search."""
  visions = [v.strip() for v in visions if v.strip()]
  llms = [l.strip() for l in llms if l.strip()]
  if not visions or not llms:
    raise mordal.MordalError("--mordal_live needs --vision_models and --llm_models (the "
                             "candidates are every encoder with every LLM)")
  for flag, names in (("--vision_models", visions), ("--llm_models", llms)):
    if len(set(names)) != len(names):
      raise mordal.MordalError(f"{flag} lists a model twice: {', '.join(names)}")
  out = {(v, l): candidate_name(v, l) for v in visions for l in llms}
  if len(set(out.values())) != len(out):
    raise mordal.MordalError("two candidates get the same name; use distinct model paths")
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
    self.journal = os.path.join(base.workdir, CALLS_FILE)
    self.answered = _read_calls(self.journal)

  def config_for(self, candidate: str, steps: int) -> loop.TrainConfig:
    vision, llm = self.by_name[candidate]
    optim = dataclasses.replace(self.base.optim, schedule_steps=self.full_steps)
    return candidate_config(self.base, vision, llm, max_steps=steps, optim=optim,
                            workdir=workdir_of(self.base.workdir, candidate), progress=False)

  def __call__(self, candidate: str, fraction: float) -> tuple[float, float]:
    if candidate not in self.by_name:
      raise mordal.MordalError(f"unknown candidate {candidate!r}")
    steps = max(1, round(fraction * self.full_steps))
    config = self.config_for(candidate, steps)
    key = self._call_key(config)
    accuracy = _agreed(self.answered.get(key, float("nan")))
    answered_before = not np.isnan(accuracy)
    if not answered_before:
      built = loop.build_model(config)
      loop.train(config, built=built)
      result = evaluate_run.evaluate(config, built=built, metrics=("vqa",), limit=self.eval_limit,
                                     batch_size=self.eval_batch_size, progress=False)
      accuracy = float(result["vqa_accuracy"])
      self.answered[key] = accuracy
      if parallel.is_primary():
        atomic.makedirs(self.base.workdir)
        atomic.append_text(self.journal, json.dumps({"key": key, "candidate": candidate,
                                                     "steps": steps, "accuracy": accuracy}) + "\n")
    vision, llm = self.by_name[candidate]
    self.records.append({"candidate": candidate, "vision": vision, "llm": llm,
                         "data_fraction": fraction, "accuracy": accuracy, "cost": float(steps)})
    self.reached[candidate] = max(self.reached.get(candidate, 0), steps)
    if self.progress is not None:
      grid = len(self.by_name) * self.full_steps
      fields = [candidate, f"fraction {fraction:g}", f"accuracy {accuracy:.4f}", f"steps {steps}",
                f"search cost {sum(self.reached.values())} of grid {grid} steps"]
      if answered_before:
        self.progress.done_before(fields)
      else:
        self.progress.done(fields)
    return accuracy, float(steps)

  def _call_key(self, config: loop.TrainConfig) -> str:
    """What identifies a call's answer: its whole training config and the evaluation's size."""
    described = json.dumps([dataclasses.asdict(config), self.eval_limit], sort_keys=True,
                           default=str)
    return hashlib.sha256(described.encode()).hexdigest()

  def curves_csv(self) -> str:
    """What was trained, in the replay table's format (columns of ``--curves``)."""
    rows, seen = [], set()
    for row in self.records:
      key = (row["candidate"], row["data_fraction"])
      if key not in seen:
        seen.add(key)
        rows.append(row)
    return atomic.csv_text(rows, list(tables.CURVE_COLUMNS))


CALLS_FILE = "mordal_live_calls.jsonl"


def _read_calls(path: str) -> dict[str, float]:
  """The answered calls of ``path`` (key → accuracy); a line cut short by a kill is ignored."""
  if not atomic.isfile(path):
    return {}
  answered = {}
  with atomic.open_text(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        answered[str(record["key"])] = float(record["accuracy"])
      except (ValueError, KeyError, TypeError):
        continue
  return answered


def _agreed(value: float) -> float:
  """Process 0's answer on every process (hosts with their own disks read their own journal)."""
  if jax.process_count() == 1:
    return value
  return float(multihost_utils.broadcast_one_to_all(np.float64(value)))


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


def search_live(base: loop.TrainConfig, candidates: dict[tuple[str, str], str],
                vision_similarity: str, llm_similarity: Sequence[str],
                config: mordal.MordalConfig, *, eval_limit: int | None, eval_batch_size: int,
                progress: progress_lib.Progress | None = None) -> tuple[dict, str]:
  """The Mordal search over ``candidates``, each ``train(candidate, fraction)`` a real run of
  ``base``'s recipe (``LiveTrainer``); returns the JSON payload and the recorded curves (CSV in
  the replay table's format)."""
  if not vision_similarity:
    raise mordal.MordalError("--vision_similarity is required")
  trainer = LiveTrainer(base, candidates, full_steps=base.max_steps, eval_limit=eval_limit,
                        eval_batch_size=eval_batch_size, progress=progress)
  vision_names, vision_sim = tables.read_similarity(vision_similarity)
  result = mordal.search(candidates, vision_names, vision_sim,
                         tables.read_llm_similarity(list(llm_similarity)), trainer, config)
  payload = live_payload(result, trainer, config, {
      "vision_models": list(dict.fromkeys(v for v, _ in candidates)),
      "llm_models": list(dict.fromkeys(l for _, l in candidates)),
      "vision_similarity": vision_similarity, "llm_similarity": list(llm_similarity),
      "workdir": base.workdir})
  return payload, trainer.curves_csv()
