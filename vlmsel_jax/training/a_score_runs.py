"""The A score over a list of candidates (METHODS §4): stage-1 training per candidate, then the
held-out caption log-likelihood, written as one table.

In ``output_dir``: ``a_scores.csv`` (one row per candidate) and ``a_scores.json`` beside it,
rewritten after every candidate so a kill loses nothing finished, and each candidate's run in
``runs/<candidate>`` (resumed if interrupted; a finished run is evaluated again without
retraining). The ``a_score`` binary is the command line of ``score_candidates``.
"""

from __future__ import annotations

import os

from absl import logging

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import parallel
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import loop
from vlmsel_jax.training import progress as progress_lib

TABLE_FILE = "a_scores.csv"
JSON_FILE = "a_scores.json"
RUNS_DIR = "runs"
COLUMNS = ("candidate", "vision", "vision_layer", "a_score", "a_score_std", "pairs", "steps",
           "final_loss", "workdir")


def run_dir(output_dir: str, name: str) -> str:
  """Where candidate ``name`` trains: ``<output_dir>/runs/<name>`` (``/`` of a Hub id → ``_``)."""
  return os.path.join(output_dir, RUNS_DIR, name.replace("/", "_"))


def table_csv(rows: list[dict]) -> str:
  return atomic.csv_text(rows, COLUMNS)


def score_candidates(configs: dict[str, loop.TrainConfig], output_dir: str, *,
                     eval_data: str | None = None, limit: int | None = None,
                     batch_size: int = 16,
                     progress: progress_lib.Progress | None = None) -> list[dict]:
  """Trains (or resumes) stage 1 of every candidate and measures its A score.

  Args:
    configs: candidate name → its stage-1 run (``workdir`` usually ``run_dir(output_dir, name)``).
    output_dir: Where the table goes.
    eval_data: Held-out data spec (default: the test split of each run's training data).
    limit: Held-out captions (None: all).
    batch_size: Evaluation batch size.
    progress: Prints a line per candidate as it finishes.

  Returns:
    The table's rows, in the order of ``configs``.
  """
  for name, config in configs.items():
    if config.stage != 1:
      raise ValueError(f"{name}: the A score is defined after stage-1 training, not stage "
                       f"{config.stage}")
  progress = progress or progress_lib.Progress(len(configs), enabled=False)
  rows = []
  for name, config in configs.items():
    logging.info("candidate %s: stage 1 in %s", name, config.workdir)
    built = loop.build_model(config)
    summary = loop.train(config, built=built)
    scores = evaluate_run.evaluate(config, built=built, data=eval_data, metrics=("a_score",),
                                   limit=limit, batch_size=batch_size)
    rows.append({"candidate": name, "vision": config.vision,
                 "vision_layer": config.vlm.vision_layer, "a_score": scores["a_score"],
                 "a_score_std": scores["a_score_std"], "pairs": scores["pairs"],
                 "steps": summary.get("steps"), "final_loss": loop.final_loss(config.workdir),
                 "workdir": config.workdir})
    if parallel.is_primary():  # Rewritten after each candidate: a kill loses nothing finished.
      atomic.write_text_atomic(os.path.join(output_dir, TABLE_FILE), table_csv(rows))
      atomic.write_json_atomic(os.path.join(output_dir, JSON_FILE), {"rows": rows})
    fields = [name, f"A {scores['a_score']:.4f}", f"steps {summary.get('steps')}"]
    if rows[-1]["final_loss"] is not None:
      fields.append(f"loss {rows[-1]['final_loss']:.4f}")
    # A run whose training was finished before is only evaluated again: no training time to
    # time, nor to count in the estimate of what is left.
    if summary.get("resumed_from", 0) >= config.max_steps:
      progress.done_before(fields)
    else:
      progress.done(fields)
  return rows
