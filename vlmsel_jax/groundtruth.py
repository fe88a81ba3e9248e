r"""Ground truth for encoder selection: train a VLM per candidate and measure what it learned.

  python -m vlmsel_jax.groundtruth --flagfile=configs/demo_groundtruth.flags
  python -m vlmsel_jax.groundtruth --flagfile=configs/demo_groundtruth.flags --gt_seeds=1 \
      --vision_candidates=efficientnet-lite0,efficientnet-lite2   # seed-to-seed spread

For every vision candidate (a zoo spec with an optional variant, ``efficientnet-lite0@res=160``)
and every seed of ``--gt_seeds``: stage 1 (projector on captions), the A score on held-out
captions, stage 2 (projector + LoRA on VQA, from the stage-1 projector), and VQA accuracy on
held-out questions, each stage with its own budget (``--stage1_*`` / ``--stage2_*``); every other
setting is the training binary's flag of the same name, shared by all candidates. The tower
layer is the spec's own (``@layer=``), else ``--vision_layer``: to judge training-free scores,
set it to the layer they were extracted from (``-1`` by default), so that a candidate names the
same features in both.

Writes two CSVs (atomically, after every run, so a kill loses only the run in flight; a re-run
skips what is done and resumes a half-trained run from its checkpoint):

* ``<stem>_runs.csv``: one row per (candidate, seed) with accuracy, A score, losses, minutes, the
  date and the command;
* ``--groundtruth_output``: one row per candidate, the mean over its seeds (``accuracy``,
  ``a_score``), their spread (``accuracy_std`` with two or more seeds), what ``vlmsel_jax.score
  --ground_truth`` reads. A JSON beside it records the seed-to-seed spread over the pool.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

from vlmsel_jax import atomic
from vlmsel_jax import flag_util
from vlmsel_jax import parallel
from vlmsel_jax import runtime_flags
from vlmsel_jax import train as train_binary
from vlmsel_jax import zoo
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import loop

_CANDIDATES = flag_util.shared(flags.DEFINE_list, "vision_candidates", None, "Vision "
                               "candidates: specs with optional variants, e.g. "
                               "efficientnet-lite0@layer=-3,res=160.")
_OUTPUT = flags.DEFINE_string("groundtruth_output", None, "Per-candidate CSV (the runs CSV and a "
                              "JSON summary go beside it).")
_SEEDS = flags.DEFINE_list("gt_seeds", ["0"], "Seeds: every candidate trains once per seed "
                           "(initialisation and data order).")
_STAGE1_STEPS = flags.DEFINE_integer("stage1_steps", 100, "Stage-1 steps.", lower_bound=1)
_STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", 100, "Stage-2 steps.", lower_bound=1)
_STAGE1_LR = flags.DEFINE_float("stage1_learning_rate", 3e-4, "Stage-1 peak learning rate.",
                                lower_bound=0.0)
_STAGE2_LR = flags.DEFINE_float("stage2_learning_rate", 2e-4, "Stage-2 peak learning rate.",
                                lower_bound=0.0)
_STAGE1_BATCH = flags.DEFINE_integer("stage1_batch_size", 16, "Stage-1 batch size.",
                                     lower_bound=1)
_STAGE2_BATCH = flags.DEFINE_integer("stage2_batch_size", 16, "Stage-2 batch size.",
                                     lower_bound=1)
_STAGE1_MAX_LEN = flags.DEFINE_integer("stage1_max_len", 12, "Stage-1 sequence length.",
                                       lower_bound=2)
_STAGE2_MAX_LEN = flags.DEFINE_integer("stage2_max_len", 40, "Stage-2 sequence length.",
                                       lower_bound=2)
_STAGE1_WARMUP = flags.DEFINE_float("stage1_warmup_ratio", 0.05, "Stage-1 warm-up fraction.",
                                    lower_bound=0.0, upper_bound=1.0)
_STAGE2_WARMUP = flags.DEFINE_float("stage2_warmup_ratio", 0.03, "Stage-2 warm-up fraction.",
                                    lower_bound=0.0, upper_bound=1.0)
_A_LIMIT = flags.DEFINE_integer("a_score_limit", 300, "Held-out captions of the A score "
                                "(0: all).", lower_bound=0)
_VQA_LIMIT = flags.DEFINE_integer("vqa_limit", 300, "Held-out questions of the VQA accuracy "
                                  "(0: all).", lower_bound=0)

RUN_COLUMNS = ("candidate", "vision", "vision_layer", "seed", "accuracy", "a_score",
               "majority_accuracy", "questions", "captions", "stage1_steps", "stage2_steps",
               "stage1_loss", "stage2_loss", "minutes", "date", "command")
SUMMARY_COLUMNS = ("candidate", "vision_layer", "accuracy", "accuracy_std", "seeds", "a_score",
                   "majority_accuracy", "questions", "stage1_steps", "stage2_steps", "date",
                   "command")


class GroundTruthError(ValueError):
  """Bad flags or a runs file that does not fit them; reported as one line."""


@dataclasses.dataclass(frozen=True)
class StageBudget:
  steps: int
  learning_rate: float
  batch_size: int
  max_len: int
  warmup_ratio: float


def stage_config(base: loop.TrainConfig, *, vision: str, stage: int, seed: int, workdir: str,
                 budget: StageBudget, init_from: str | None = None) -> loop.TrainConfig:
  """``base`` (the training flags) turned into one stage of one candidate's run."""
  accumulate = base.optim.accumulate
  optim = dataclasses.replace(base.optim, learning_rate=budget.learning_rate,
                              warmup_ratio=budget.warmup_ratio,
                              schedule_steps=max(budget.steps // accumulate, 1))
  return dataclasses.replace(
      base, vision=vision, stage=stage, seed=seed, workdir=workdir, init_from=init_from,
      max_steps=budget.steps, batch_size=budget.batch_size, max_len=budget.max_len, optim=optim,
      data_kind=None)


def run_one(base: loop.TrainConfig, vision: str, name: str, seed: int, root: str,
            stage1: StageBudget, stage2: StageBudget, *, a_limit: int | None,
            vqa_limit: int | None, eval_batch_size: int, eval_data: str | None,
            command: str) -> dict:
  """Stage 1 → A score → stage 2 → VQA accuracy for one candidate and seed; its runs row."""
  start = time.time()
  run_dir = os.path.join(root, name.replace("/", "_"), f"seed{seed}")
  s1 = stage_config(base, vision=vision, stage=1, seed=seed,
                    workdir=os.path.join(run_dir, "stage1"), budget=stage1)
  built = loop.build_model(s1)
  summary1 = loop.train(s1, built=built)
  a = evaluate_run.evaluate(s1, built=built, data=eval_data, metrics=("a_score",),
                            limit=a_limit, batch_size=eval_batch_size)
  del built
  s2 = stage_config(base, vision=vision, stage=2, seed=seed,
                    workdir=os.path.join(run_dir, "stage2"), budget=stage2,
                    init_from=s1.workdir)
  built = loop.build_model(s2)
  summary2 = loop.train(s2, built=built)
  v = evaluate_run.evaluate(s2, built=built, data=eval_data, metrics=("vqa",),
                            limit=vqa_limit, batch_size=eval_batch_size)
  return {
      "candidate": name, "vision": vision, "vision_layer": s1.vlm.vision_layer, "seed": seed,
      "accuracy": v["vqa_accuracy"],
      "a_score": a["a_score"], "majority_accuracy": v.get("majority_accuracy"),
      "questions": v["questions"], "captions": a["pairs"],
      "stage1_steps": summary1.get("step"), "stage2_steps": summary2.get("step"),
      "stage1_loss": loop.final_loss(s1.workdir), "stage2_loss": loop.final_loss(s2.workdir),
      "minutes": round((time.time() - start) / 60, 2),
      "date": datetime.date.today().isoformat(), "command": command,
  }


def read_runs(path: str) -> list[dict]:
  """The rows of a runs CSV (numbers parsed); [] when it does not exist."""
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
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
        for key in ("accuracy", "a_score", "majority_accuracy"):
          row[key] = float(row[key]) if row.get(key) not in (None, "") else None
      except ValueError:
        raise GroundTruthError(f"{path}:{line}: a seed, accuracy or A score is not a "
                               "number") from None
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


def runs_path(output: str) -> str:
  return os.path.splitext(output)[0] + "_runs.csv"


def write_tables(output: str, runs: list[dict], order: list[str]) -> dict:
  """Rewrites the runs CSV, the summary CSV and its JSON; returns the spread."""
  summary, spread = summarize(runs, order)
  atomic.write_text_atomic(runs_path(output), atomic.csv_text(runs, RUN_COLUMNS))
  atomic.write_text_atomic(output, atomic.csv_text(summary, SUMMARY_COLUMNS))
  atomic.write_json_atomic(os.path.splitext(output)[0] + ".json",
                           {"candidates": summary, "seed_spread": spread})
  return spread


def _command() -> str:
  return "python -m vlmsel_jax.groundtruth " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUTPUT.value or not _OUTPUT.value.endswith(".csv"):
    raise app.UsageError("--groundtruth_output is required (a .csv path)")
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise app.UsageError(f"--gt_seeds: not integers: {','.join(_SEEDS.value)}") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--gt_seeds: give distinct seeds, got {','.join(_SEEDS.value)}")
  candidates, names = train_binary.vision_candidates(_CANDIDATES.value)
  runtime_flags.initialize_from_flags()
  base = train_binary.config_from_flags()
  stage1 = StageBudget(_STAGE1_STEPS.value, _STAGE1_LR.value, _STAGE1_BATCH.value,
                       _STAGE1_MAX_LEN.value, _STAGE1_WARMUP.value)
  stage2 = StageBudget(_STAGE2_STEPS.value, _STAGE2_LR.value, _STAGE2_BATCH.value,
                       _STAGE2_MAX_LEN.value, _STAGE2_WARMUP.value)
  output = _OUTPUT.value
  try:
    runs = read_runs(runs_path(output))
  except GroundTruthError as e:
    print(f"groundtruth: error: {e}", file=sys.stderr)
    sys.exit(1)
  done = {(r["candidate"], r["seed"]) for r in runs}
  command = _command()
  for seed in seeds:
    for spec, name in zip(candidates, names):
      if (name, seed) in done:
        logging.info("%s seed %d: already in %s", name, seed, runs_path(output))
        continue
      logging.info("%s seed %d: stage 1, A score, stage 2, VQA accuracy", name, seed)
      row = run_one(base, spec, name, seed, base.workdir, stage1, stage2,
                    a_limit=_A_LIMIT.value or None, vqa_limit=_VQA_LIMIT.value or None,
                    eval_batch_size=flags.FLAGS.eval_batch_size,
                    eval_data=flags.FLAGS.eval_data, command=command)
      runs.append(row)
      if parallel.is_primary():
        write_tables(output, runs, names)
      print(f"{name}\tseed {seed}\taccuracy {row['accuracy']:.4f}\tA {row['a_score']:.4f}\t"
            f"{row['minutes']} min", flush=True)
  if parallel.is_primary():
    spread = write_tables(output, runs, names)
    print(json.dumps({"seed_spread": spread}))


if __name__ == "__main__":
  app.run(main)
