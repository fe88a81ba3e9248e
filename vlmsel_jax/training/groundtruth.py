"""Ground truth for encoder selection: train a VLM per candidate and seed, and measure what it
learned (the library of the ``groundtruth`` binary).

For every candidate (a vision spec, or a (vision, LLM) pair) and seed: stage 1 (projector on
captions), the A score on held-out captions, stage 2 (projector + LoRA on VQA, from the stage-1
projector), and VQA accuracy on held-out questions, each stage with its own budget
(``StageBudget``); every other setting is the candidate's ``TrainConfig``, the training recipe.

In ``output_dir`` (written atomically after every run, so a kill loses only the run in flight;
a re-run skips what is done and resumes a half-trained run from its checkpoint):

* ``groundtruth_runs.csv``: one row per (candidate, seed) with accuracy, A score, losses,
  minutes, the date and the command;
* ``groundtruth.csv``: one row per candidate, the mean over its seeds (``accuracy``,
  ``a_score``), their spread (``accuracy_std`` with two or more seeds), what ``vlmsel_jax.score
  --ground_truth`` reads; ``groundtruth.json`` beside it records the seed-to-seed spread over
  the pool;
* ``groundtruth_curves_seed<S>.csv``: with ``Options.curve_fractions``, the learning curves (see
  ``train_with_curve``) in the table ``vlmsel_jax.select --method=mordal --curves`` replays
  (``candidate,vision,llm,data_fraction,accuracy,cost``, fraction 1.0 being the full run). Cost
  is cumulative and counted in stage-2 steps; a candidate's stage 1 is added to it as the stage-2
  steps of equal token count (``stage1_cost``), since a search pays stage 1 for every candidate
  it trains at all;
* ``runs/<candidate>/seed<S>/stage1`` and ``stage2``: the training runs.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import time
from typing import Sequence

import numpy as np
from absl import logging

from vlmsel_jax import zoo
from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import parallel
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import loop
from vlmsel_jax.training import progress as progress_lib

TABLE_FILE = "groundtruth.csv"
RUNS_DIR = "runs"
RUN_COLUMNS = ("candidate", "vision", "llm", "vision_layer", "seed", "accuracy", "a_score",
               "majority_accuracy", "questions", "captions", "stage1_steps", "stage2_steps",
               "stage1_loss", "stage2_loss", "minutes", "date", "command")
# The numeric ones among them, which read_runs parses back.
_FLOAT_RUN_COLUMNS = ("accuracy", "a_score", "majority_accuracy", "stage1_loss", "stage2_loss",
                      "minutes")
_INT_RUN_COLUMNS = ("vision_layer", "questions", "captions", "stage1_steps", "stage2_steps")
CURVE_COLUMNS = ("candidate", "vision", "llm", "data_fraction", "accuracy", "cost", "seed",
                 "stage2_steps")
CURVE_FILE = "curve.jsonl"
CURVE_EXAMPLES = 5  # Greedy answers kept with each curve point.
SUMMARY_COLUMNS = ("candidate", "vision_layer", "accuracy", "accuracy_std", "seeds", "a_score",
                   "majority_accuracy", "questions", "stage1_steps", "stage2_steps", "date",
                   "command")


class GroundTruthError(ValueError):
  """Bad options or a runs file that does not fit them; reported as one line."""


@dataclasses.dataclass(frozen=True)
class StageBudget:
  steps: int
  learning_rate: float
  batch_size: int
  max_len: int
  warmup_ratio: float


@dataclasses.dataclass(frozen=True)
class Options:
  """What a ground truth measures, beyond each candidate's training recipe.

  Attributes:
    stage1, stage2: The two stages' budgets.
    seeds: Every candidate trains once per seed (initialisation and data order).
    a_limit: Held-out captions of the A score (None: all).
    vqa_limit: Held-out questions of the VQA accuracy (None: all).
    eval_batch_size: Evaluation batch size.
    eval_data: Held-out data spec (None: the test split of the training data).
    curve_fractions: Stage-2 fractions in (0, 1) also measured (``train_with_curve``).
    command: The command line, recorded in every row.
  """

  stage1: StageBudget
  stage2: StageBudget
  seeds: tuple[int, ...] = (0,)
  a_limit: int | None = None
  vqa_limit: int | None = None
  eval_batch_size: int = 16
  eval_data: str | None = None
  curve_fractions: tuple[float, ...] = ()
  command: str = ""

  def __post_init__(self):
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise GroundTruthError(f"give distinct seeds, got {list(self.seeds)}")
    if any(not 0.0 < r < 1.0 for r in self.curve_fractions):
      raise GroundTruthError(f"curve fractions must be in (0, 1) (the full run is always "
                             f"measured), got {list(self.curve_fractions)}")


def table_path(output_dir: str) -> str:
  return os.path.join(output_dir, TABLE_FILE)


def runs_path(output_dir: str) -> str:
  return os.path.splitext(table_path(output_dir))[0] + "_runs.csv"


def summary_path(output_dir: str) -> str:
  return os.path.splitext(table_path(output_dir))[0] + ".json"


def curves_path(output_dir: str, seed: int) -> str:
  return os.path.splitext(table_path(output_dir))[0] + f"_curves_seed{seed}.csv"


def candidate_dir(output_dir: str, name: str) -> str:
  """Where candidate ``name`` trains: ``<output_dir>/runs/<name>`` (``/`` of a Hub id → ``_``),
  one ``seed<S>/stage1``, ``seed<S>/stage2`` pair per seed."""
  return os.path.join(output_dir, RUNS_DIR, name.replace("/", "_"))


def candidate_grid(visions: Sequence[str], vision_names: Sequence[str], llms: Sequence[str],
                   llm_names: Sequence[str], llm: str | None = None
                   ) -> list[tuple[str, str, str]]:
  """(name, vision spec, LLM spec) of every candidate: each vision with the one ``llm``, named by
  the vision alone, without ``llms``; else every (vision, LLM) pair, vision-major, named
  ``<vision>+<llm>`` (the zoo names, variants included; a multi-encoder vision in parentheses,
  ``(a+b)+<llm>``, so ``zoo.split_candidate_pair_name`` reads the pair back). The tuples carry
  the specs themselves, so nothing downstream parses a name."""
  if not llms:
    return [(name, v, llm) for v, name in zip(visions, vision_names)]
  return [(zoo.candidate_pair_name(vn, ln), v, x) for v, vn in zip(visions, vision_names)
          for x, ln in zip(llms, llm_names)]


def stage_config(base: loop.TrainConfig, *, stage: int, seed: int, workdir: str,
                 budget: StageBudget, init_from: str | None = None) -> loop.TrainConfig:
  """``base`` (a candidate's training recipe: its models, tower layer and the rest) turned into
  one stage of its run."""
  accumulate = base.optim.accumulate
  optim = dataclasses.replace(base.optim, learning_rate=budget.learning_rate,
                              warmup_ratio=budget.warmup_ratio,
                              schedule_steps=max(budget.steps // accumulate, 1))
  return dataclasses.replace(
      base, stage=stage, seed=seed, workdir=workdir, init_from=init_from,
      max_steps=budget.steps, batch_size=budget.batch_size, max_len=budget.max_len, optim=optim,
      data_kind=None)


def fraction_steps(fractions: list[float], steps: int) -> list[tuple[float, int]]:
  """(fraction, stage-2 step) of every curve point below the full run, the full run last."""
  points = []
  for r in sorted(set(fractions)):
    n = max(1, round(r * steps))
    if n < steps and all(n != m for _, m in points):
      points.append((r, n))
  return points + [(1.0, steps)]


def stage1_cost(stage1: StageBudget, stage2: StageBudget) -> float:
  """Stage 1 in stage-2 steps of the same token count (the curves' cost unit)."""
  return stage1.steps * stage1.batch_size * stage1.max_len / (stage2.batch_size * stage2.max_len)


def read_curve_points(workdir: str) -> dict[int, float]:
  """Stage-2 step → VQA accuracy already measured in ``workdir`` (its curve.jsonl)."""
  path = os.path.join(workdir, CURVE_FILE)
  if not atomic.exists(path):
    return {}
  points = {}
  with atomic.open_text(path) as f:
    for line in f:
      line = line.strip()
      if line:  # A kill mid-write leaves at most a partial last line; it is measured again.
        try:
          record = json.loads(line)
          points[int(record["step"])] = float(record["accuracy"])
        except (ValueError, KeyError, TypeError):
          continue
  return points


def train_with_curve(s2: loop.TrainConfig, built, points: list[tuple[float, int]], *,
                     evaluate_at) -> tuple[dict, dict[int, float]]:
  """Stage 2 in segments ending at each point's step, measuring accuracy at each.

  ``evaluate_at()`` measures the latest checkpoint: its VQA evaluation (``vqa_accuracy`` and
  ``examples``, the first greedy answers). Each point goes to curve.jsonl with its first
  ``CURVE_EXAMPLES`` answers, so that what a model says early in training can be read later (the
  checkpoints of early points are not kept). Points measured by an earlier (killed) run are read
  back from curve.jsonl; a point whose step the run has already passed without measuring it
  cannot be measured any more, and is an error rather than a silent gap.
  """
  measured = read_curve_points(s2.workdir)
  latest = ckpt_lib.latest_step(os.path.join(s2.workdir, loop.CHECKPOINT_DIR)) or 0
  for r, step in points:
    if step not in measured and step < latest:
      raise GroundTruthError(
          f"{s2.workdir}: stage 2 is already at step {latest}, past the curve point at fraction "
          f"{r:g} (step {step}), which was never measured; remove that directory to train "
          "stage 2 again with --curve_fractions")
  summary = {}
  for r, step in points:
    summary = loop.train(dataclasses.replace(s2, max_steps=step), built=built)
    if step not in measured:
      result = evaluate_at()
      measured[step] = float(result["vqa_accuracy"])
      if parallel.is_primary():
        examples = [{k: e.get(k) for k in ("question", "prediction", "answer")}
                    for e in result.get("examples", [])[:CURVE_EXAMPLES]]
        atomic.append_text(os.path.join(s2.workdir, CURVE_FILE),
                           json.dumps({"fraction": r, "step": step, "accuracy": measured[step],
                                       "examples": examples}) + "\n")
  return summary, measured


def run_one(base: loop.TrainConfig, name: str, seed: int,
            options: Options) -> tuple[dict, list[dict]]:
  """Stage 1 → A score → stage 2 → VQA accuracy for one candidate and seed, in
  ``<base.workdir>/seed<S>``.

  Returns its runs row and its learning-curve rows (empty without ``options.curve_fractions``).
  """
  start = time.time()
  stage1, stage2 = options.stage1, options.stage2
  run_dir = os.path.join(base.workdir, f"seed{seed}")
  s1 = stage_config(base, stage=1, seed=seed, workdir=os.path.join(run_dir, "stage1"),
                    budget=stage1)
  built = loop.build_model(s1)
  summary1 = loop.train(s1, built=built)
  a = evaluate_run.evaluate(s1, built=built, data=options.eval_data, metrics=("a_score",),
                            limit=options.a_limit, batch_size=options.eval_batch_size)
  del built
  s2 = stage_config(base, stage=2, seed=seed, workdir=os.path.join(run_dir, "stage2"),
                    budget=stage2, init_from=s1.workdir)
  built = loop.build_model(s2)
  last_eval = {}

  def evaluate_vqa() -> dict:
    last_eval.update(evaluate_run.evaluate(s2, built=built, data=options.eval_data,
                                           metrics=("vqa",), limit=options.vqa_limit,
                                           batch_size=options.eval_batch_size))
    return last_eval

  curve_rows = []
  if options.curve_fractions:
    points = fraction_steps(list(options.curve_fractions), stage2.steps)
    summary2, measured = train_with_curve(s2, built, points, evaluate_at=evaluate_vqa)
    if not last_eval:  # Every point was measured before a kill; the full run's details again.
      evaluate_vqa()
    offset = stage1_cost(stage1, stage2)
    curve_rows = [{"candidate": name, "vision": base.vision, "llm": base.llm,
                   "data_fraction": r, "accuracy": measured[step], "cost": offset + step,
                   "seed": seed, "stage2_steps": step} for r, step in points]
  else:
    summary2 = loop.train(s2, built=built)
    evaluate_vqa()
  v = last_eval
  row = {
      "candidate": name, "vision": base.vision, "llm": base.llm,
      "vision_layer": s1.vlm.vision_layer, "seed": seed,
      "accuracy": v["vqa_accuracy"],
      "a_score": a["a_score"], "majority_accuracy": v.get("majority_accuracy"),
      "questions": v["questions"], "captions": a["pairs"],
      "stage1_steps": summary1.get("steps"), "stage2_steps": summary2.get("steps"),
      "stage1_loss": loop.final_loss(s1.workdir), "stage2_loss": loop.final_loss(s2.workdir),
      "minutes": round((time.time() - start) / 60, 2),
      "date": datetime.date.today().isoformat(), "command": options.command,
  }
  return row, curve_rows


def read_runs(path: str) -> list[dict]:
  """The rows of a runs CSV (numbers parsed); [] when it does not exist."""
  if not atomic.exists(path):
    return []
  with atomic.open_text(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("candidate", "seed", "accuracy", "a_score")
               if c not in (reader.fieldnames or [])]
    if missing:
      raise GroundTruthError(f"{path}: not a runs file of this binary (no "
                             f"{', '.join(missing)} column)")
    rows = []
    for line, row in enumerate(reader, start=2):
      try:
        row["seed"] = int(row["seed"])
        # Every numeric column back as a number, so that a resumed run's summary JSON has
        # the same types as one written in a single process.
        for key in _FLOAT_RUN_COLUMNS:
          row[key] = float(row[key]) if row.get(key) not in (None, "") else None
        for key in _INT_RUN_COLUMNS:
          if row.get(key) not in (None, ""):
            row[key] = int(row[key])
      except ValueError:
        raise GroundTruthError(f"{path}:{line}: a seed, accuracy, A score, layer, count or "
                               "time is not a number") from None
      if row.get("vision_layer") in (None, ""):  # Written before the column existed.
        row["vision_layer"] = zoo.split_variant(row.get("vision") or row["candidate"])[1].layer
      rows.append(row)
  return rows


def summarize(runs: list[dict], order: list[str]) -> tuple[list[dict], dict]:
  """Per-candidate means over seeds (candidates in ``order`` first), and the pool's spread.

  The spread: for every candidate with two or more seeds, the sample standard deviation of its
  accuracies; reported as their mean and maximum, and the largest gap between two seeds.
  """
  by_candidate: dict[str, list[dict]] = {}
  for row in runs:
    by_candidate.setdefault(row["candidate"], []).append(row)
  names = [n for n in order if n in by_candidate] + sorted(set(by_candidate) - set(order))
  summary, stds, gaps = [], [], []
  for name in names:
    rows = sorted(by_candidate[name], key=lambda r: r["seed"])
    acc = np.array([r["accuracy"] for r in rows], np.float64)
    a_scores = [r["a_score"] for r in rows if r["a_score"] is not None]
    std = float(acc.std(ddof=1)) if len(acc) > 1 else None
    if std is not None:
      stds.append(std)
      gaps.append(float(acc.max() - acc.min()))
    majority = [r["majority_accuracy"] for r in rows if r["majority_accuracy"] is not None]
    summary.append({
        "candidate": name, "vision_layer": rows[0].get("vision_layer"),
        "accuracy": float(acc.mean()), "accuracy_std": std,
        "seeds": " ".join(str(r["seed"]) for r in rows),
        "a_score": float(np.mean(a_scores)) if a_scores else None,
        "majority_accuracy": majority[0] if majority else None,
        "questions": rows[0].get("questions"), "stage1_steps": rows[0].get("stage1_steps"),
        "stage2_steps": rows[0].get("stage2_steps"), "date": max(r["date"] for r in rows),
        "command": rows[-1].get("command"),
    })
  spread = {"candidates_with_several_seeds": len(stds),
            "mean_accuracy_std": float(np.mean(stds)) if stds else None,
            "max_accuracy_std": float(np.max(stds)) if stds else None,
            "max_seed_gap": float(np.max(gaps)) if gaps else None}
  return summary, spread


def read_curves(path: str) -> list[dict]:
  """The rows of a curves CSV as written (strings); [] when it does not exist."""
  if not atomic.exists(path):
    return []
  with atomic.open_text(path, newline="") as f:
    return list(csv.DictReader(f))


def write_tables(output_dir: str, runs: list[dict], order: list[str]) -> dict:
  """Rewrites the runs CSV, the summary CSV and its JSON; returns the spread."""
  summary, spread = summarize(runs, order)
  atomic.write_text_atomic(runs_path(output_dir), atomic.csv_text(runs, RUN_COLUMNS))
  atomic.write_text_atomic(table_path(output_dir), atomic.csv_text(summary, SUMMARY_COLUMNS))
  atomic.write_json_atomic(summary_path(output_dir),
                           {"candidates": summary, "seed_spread": spread})
  return spread


def _run_fields(row: dict) -> list[str]:
  """A runs row as its progress line's fields: ``<candidate>, seed S, accuracy, A``."""
  fields = [row["candidate"], f"seed {row['seed']}"]
  for key, label in (("accuracy", "accuracy"), ("a_score", "A")):
    if row.get(key) is not None:
      fields.append(f"{label} {row[key]:.4f}")
  return fields


def run(candidates: dict[str, loop.TrainConfig], output_dir: str, options: Options, *,
        progress: progress_lib.Progress | None = None) -> dict:
  """The ground truth of ``candidates`` (name → training recipe, its ``workdir`` the candidate's
  directory, usually ``candidate_dir(output_dir, name)``) for every seed; returns the spread.

  Runs already in ``output_dir``'s runs CSV (with their curve, when curves are measured) are
  skipped; the rest train, resuming from their checkpoints.

  Raises:
    GroundTruthError: a runs file that is not one, or a curve point that can no longer be
      measured.
  """
  names = list(candidates)
  runs = read_runs(runs_path(output_dir))
  done = {(r["candidate"], r["seed"]) for r in runs}
  # One line per (candidate, seed), counted over all of them, runs done before included.
  progress = progress or progress_lib.Progress(len(options.seeds) * len(names), enabled=False)
  for seed in options.seeds:
    curves = read_curves(curves_path(output_dir, seed)) if options.curve_fractions else []
    with_curve = {r["candidate"] for r in curves}
    for name, base in candidates.items():
      if (name, seed) in done and (not options.curve_fractions or name in with_curve):
        logging.info("%s seed %d: already in %s", name, seed, runs_path(output_dir))
        row = next(r for r in runs if (r["candidate"], r["seed"]) == (name, seed))
        progress.done_before(_run_fields(row))
        continue
      logging.info("%s seed %d: stage 1, A score, stage 2, VQA accuracy", name, seed)
      row, curve_rows = run_one(base, name, seed, options)
      # A run measured again for its curve replaces its earlier row.
      runs = [r for r in runs if (r["candidate"], r["seed"]) != (name, seed)] + [row]
      curves = [r for r in curves if r["candidate"] != name] + curve_rows
      if parallel.is_primary():
        write_tables(output_dir, runs, names)
        if curve_rows:
          atomic.write_text_atomic(curves_path(output_dir, seed),
                                   atomic.csv_text(curves, CURVE_COLUMNS))
      progress.done(_run_fields(row))
  spread = summarize(runs, names)[1]
  if parallel.is_primary():
    spread = write_tables(output_dir, runs, names)
  return spread
