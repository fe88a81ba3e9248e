r"""Ground truth for encoder selection: train a VLM per candidate and measure what it learned.

  python -m vlmsel_jax.groundtruth --flagfile=studies/demo/demo_groundtruth.flags
  python -m vlmsel_jax.groundtruth --flagfile=studies/demo/demo_groundtruth.flags --gt_seeds=1 \
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

It prints a line per (candidate, seed) as it finishes: ``[3/26] <candidate>  seed 0  accuracy
0.4120  A -3.2100  (4.1 min; 12 min so far; about 1 h 32 min left)``, or ``(done before)`` for
one a re-run skips (``vlmsel_jax.training.progress``).

With ``--llm_candidates`` (LLM specs) every vision candidate trains with every LLM: the grid of
(encoder, LLM) pairs a selection method searches. A pair is named ``<vision>+<llm>`` (the zoo
names, variants included) in every table and workdir; without the flag the one ``--llm`` is used
and a candidate is named by its vision spec alone.

With ``--curve_fractions`` (e.g. ``0.0625,0.125,0.25,0.5``) stage 2 also stops at each fraction
r of its steps, ``round(r · stage2_steps)``, and measures VQA accuracy there before going on
(the cosine schedule spans the whole budget and training continues from the checkpoint, so the
final model is the one an uninterrupted run gives). These learning curves go to
``<stem>_curves_seed<S>.csv`` in the table ``vlmsel_jax.select --method=mordal --curves`` replays
(``candidate,vision,llm,data_fraction,accuracy,cost``, fraction 1.0 being the full run). Cost is
cumulative and counted in stage-2 steps; a candidate's stage 1 is added to it as the stage-2
steps of equal token count (``stage1_steps · stage1_batch · stage1_max_len / (stage2_batch ·
stage2_max_len)``), since a search pays stage 1 for every candidate it trains at all. Each point
is kept in the stage-2 workdir (``curve.jsonl``, with its first few greedy answers) as soon as it
is measured, so a killed run resumes without measuring it again.
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

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax import zoo
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import loop
from vlmsel_jax.training import progress as progress_lib

_CANDIDATES = flag_util.shared(flags.DEFINE_list, "vision_candidates", None, "Vision "
                               "candidates: specs with optional variants, e.g. "
                               "efficientnet-lite0@layer=-3,res=160.")
_LLMS = flags.DEFINE_list("llm_candidates", [], "LLM specs: every vision candidate trains with "
                          "each, as the candidate <vision>+<llm>. Empty: the one --llm.")
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
_CURVE_FRACTIONS = flags.DEFINE_list("curve_fractions", [], "Stage-2 fractions in (0, 1) at which "
                                     "to also measure VQA accuracy (learning curves for Mordal "
                                     "replay), e.g. 0.0625,0.125,0.25,0.5.")

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
  """Bad flags or a runs file that does not fit them; reported as one line."""


@dataclasses.dataclass(frozen=True)
class StageBudget:
  steps: int
  learning_rate: float
  batch_size: int
  max_len: int
  warmup_ratio: float


def stage_config(base: loop.TrainConfig, *, vision: str, stage: int, seed: int, workdir: str,
                 budget: StageBudget, llm: str,
                 init_from: str | None = None) -> loop.TrainConfig:
  """``base`` (the training flags) turned into one stage of one candidate's run (its vision
  and LLM specs)."""
  accumulate = base.optim.accumulate
  optim = dataclasses.replace(base.optim, learning_rate=budget.learning_rate,
                              warmup_ratio=budget.warmup_ratio,
                              schedule_steps=max(budget.steps // accumulate, 1))
  return dataclasses.replace(
      base, vision=vision, llm=llm, stage=stage, seed=seed, workdir=workdir,
      init_from=init_from, max_steps=budget.steps, batch_size=budget.batch_size,
      max_len=budget.max_len, optim=optim, data_kind=None)


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


def run_one(base: loop.TrainConfig, vision: str, name: str, seed: int, root: str,
            stage1: StageBudget, stage2: StageBudget, *, a_limit: int | None,
            vqa_limit: int | None, eval_batch_size: int, eval_data: str | None,
            command: str, curve_fractions: list[float] = (),
            llm: str | None = None) -> tuple[dict, list[dict]]:
  """Stage 1 → A score → stage 2 → VQA accuracy for one candidate and seed (with ``llm``, else
  ``base.llm``).

  Returns its runs row and its learning-curve rows (empty without ``curve_fractions``).
  """
  start = time.time()
  llm = llm or base.llm
  run_dir = os.path.join(root, name.replace("/", "_"), f"seed{seed}")
  s1 = stage_config(base, vision=vision, stage=1, seed=seed,
                    workdir=os.path.join(run_dir, "stage1"), budget=stage1, llm=llm)
  built = loop.build_model(s1)
  summary1 = loop.train(s1, built=built)
  a = evaluate_run.evaluate(s1, built=built, data=eval_data, metrics=("a_score",),
                            limit=a_limit, batch_size=eval_batch_size)
  del built
  s2 = stage_config(base, vision=vision, stage=2, seed=seed,
                    workdir=os.path.join(run_dir, "stage2"), budget=stage2,
                    init_from=s1.workdir, llm=llm)
  built = loop.build_model(s2)
  last_eval = {}

  def evaluate_vqa() -> dict:
    last_eval.update(evaluate_run.evaluate(s2, built=built, data=eval_data, metrics=("vqa",),
                                           limit=vqa_limit, batch_size=eval_batch_size))
    return last_eval

  curve_rows = []
  if curve_fractions:
    points = fraction_steps(list(curve_fractions), stage2.steps)
    summary2, measured = train_with_curve(s2, built, points, evaluate_at=evaluate_vqa)
    if not last_eval:  # Every point was measured before a kill; the full run's details again.
      evaluate_vqa()
    offset = stage1_cost(stage1, stage2)
    curve_rows = [{"candidate": name, "vision": vision, "llm": llm,
                   "data_fraction": r, "accuracy": measured[step], "cost": offset + step,
                   "seed": seed, "stage2_steps": step} for r, step in points]
  else:
    summary2 = loop.train(s2, built=built)
    evaluate_vqa()
  v = last_eval
  row = {
      "candidate": name, "vision": vision, "llm": llm, "vision_layer": s1.vlm.vision_layer,
      "seed": seed,
      "accuracy": v["vqa_accuracy"],
      "a_score": a["a_score"], "majority_accuracy": v.get("majority_accuracy"),
      "questions": v["questions"], "captions": a["pairs"],
      "stage1_steps": summary1.get("steps"), "stage2_steps": summary2.get("steps"),
      "stage1_loss": loop.final_loss(s1.workdir), "stage2_loss": loop.final_loss(s2.workdir),
      "minutes": round((time.time() - start) / 60, 2),
      "date": datetime.date.today().isoformat(), "command": command,
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


def runs_path(output: str) -> str:
  return os.path.splitext(output)[0] + "_runs.csv"


def curves_path(output: str, seed: int) -> str:
  return os.path.splitext(output)[0] + f"_curves_seed{seed}.csv"


def read_curves(path: str) -> list[dict]:
  """The rows of a curves CSV as written (strings); [] when it does not exist."""
  if not atomic.exists(path):
    return []
  with atomic.open_text(path, newline="") as f:
    return list(csv.DictReader(f))


def write_tables(output: str, runs: list[dict], order: list[str]) -> dict:
  """Rewrites the runs CSV, the summary CSV and its JSON; returns the spread."""
  summary, spread = summarize(runs, order)
  atomic.write_text_atomic(runs_path(output), atomic.csv_text(runs, RUN_COLUMNS))
  atomic.write_text_atomic(output, atomic.csv_text(summary, SUMMARY_COLUMNS))
  atomic.write_json_atomic(os.path.splitext(output)[0] + ".json",
                           {"candidates": summary, "seed_spread": spread})
  return spread


def llm_grid(visions: list[str], vision_names: list[str], llms: list[str]
             ) -> tuple[list[tuple[str, str | None]], list[str]]:
  """(vision spec, LLM spec or None) of every candidate, and its name: the vision candidates
  alone (LLM None: the one --llm) without ``llms``, else every (vision, LLM) pair, vision-major,
  named ``<vision>+<llm>``. --llm is set to the first LLM when unset, so the training flags
  parse; each run replaces it with its own.

  Raises:
    app.UsageError: an LLM spec that does not resolve, is not a text model, or is repeated.
  """
  specs = [x.strip() for x in llms if x.strip()]
  if not specs:
    return [(v, None) for v in visions], list(vision_names)
  try:
    resolved = [zoo.resolve(x) for x in specs]
  except zoo.ZooError as e:
    raise app.UsageError(f"--llm_candidates: {e}") from None
  for r in resolved:
    if r.kind != "text":
      raise app.UsageError(f"--llm_candidates: {r.spec!r} is a {r.kind} model, not an LLM")
  llm_names = [r.name for r in resolved]
  if len(set(llm_names)) != len(llm_names):
    raise app.UsageError(f"--llm_candidates: duplicate LLMs in {', '.join(llm_names)}")
  if not flags.FLAGS.llm:
    flags.FLAGS.llm = specs[0]
  pairs = [(v, llm) for v in visions for llm in specs]
  names = [f"{v}+{n}" for v in vision_names for n in llm_names]
  return pairs, names


def _run_fields(row: dict) -> list[str]:
  """A runs row as its progress line's fields: ``<candidate>, seed S, accuracy, A``."""
  fields = [row["candidate"], f"seed {row['seed']}"]
  for key, label in (("accuracy", "accuracy"), ("a_score", "A")):
    if row.get(key) is not None:
      fields.append(f"{label} {row[key]:.4f}")
  return fields


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
  try:
    curve_fractions = [float(r) for r in _CURVE_FRACTIONS.value]
  except ValueError:
    raise app.UsageError(f"--curve_fractions: not numbers: "
                         f"{','.join(_CURVE_FRACTIONS.value)}") from None
  if any(not 0.0 < r < 1.0 for r in curve_fractions):
    raise app.UsageError(f"--curve_fractions: each must be in (0, 1) (the full run is always "
                         f"measured), got {','.join(_CURVE_FRACTIONS.value)}")
  if not seeds or len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--gt_seeds: give distinct seeds, got {','.join(_SEEDS.value)}")
  visions, vision_names = train_flags.vision_candidates(_CANDIDATES.value)
  pairs, names = llm_grid(visions, vision_names, _LLMS.value)
  runtime_flags.initialize_from_flags()
  base = train_flags.config_from_flags()
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
  # One line per (candidate, seed), counted over all of them, runs done before included.
  progress = progress_lib.Progress(len(seeds) * len(pairs), enabled=parallel.is_primary())
  for seed in seeds:
    curves = read_curves(curves_path(output, seed)) if curve_fractions else []
    with_curve = {r["candidate"] for r in curves}
    for (spec, llm), name in zip(pairs, names):
      if (name, seed) in done and (not curve_fractions or name in with_curve):
        logging.info("%s seed %d: already in %s", name, seed, runs_path(output))
        row = next(r for r in runs if (r["candidate"], r["seed"]) == (name, seed))
        progress.done_before(_run_fields(row))
        continue
      logging.info("%s seed %d: stage 1, A score, stage 2, VQA accuracy", name, seed)
      try:
        row, curve_rows = run_one(
            base, spec, name, seed, base.workdir, stage1, stage2,
            a_limit=_A_LIMIT.value or None, vqa_limit=_VQA_LIMIT.value or None,
            eval_batch_size=flags.FLAGS.eval_batch_size, eval_data=flags.FLAGS.eval_data,
            command=command, curve_fractions=curve_fractions, llm=llm)
      except GroundTruthError as e:
        print(f"groundtruth: error: {e}", file=sys.stderr)
        sys.exit(1)
      # A run measured again for its curve replaces its earlier row.
      runs = [r for r in runs if (r["candidate"], r["seed"]) != (name, seed)] + [row]
      curves = [r for r in curves if r["candidate"] != name] + curve_rows
      if parallel.is_primary():
        write_tables(output, runs, names)
        if curve_rows:
          atomic.write_text_atomic(curves_path(output, seed),
                                   atomic.csv_text(curves, CURVE_COLUMNS))
      progress.done(_run_fields(row))
  if parallel.is_primary():
    spread = write_tables(output, runs, names)
    print(json.dumps({"seed_spread": spread}))


def console_main():
  """The ``vlmsel-groundtruth`` console command."""
  app.run(main)


if __name__ == "__main__":
  console_main()
