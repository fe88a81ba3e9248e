r"""A score over a candidate list (METHODS §4): stage-1 training per candidate, then the held-out
caption log-likelihood, written as one table.

  python -m vlmsel_jax.a_score --flagfile=configs/a_score_demo.flags

Takes every flag of ``vlmsel_jax.train`` (the stage-1 recipe, shared by all candidates) plus
``--vision_candidates``: vision specs, each optionally with a variant (``@layer=-3``, ``@res=160``:
the Law paper treats layer and resolution choices as distinct settings; see ``vlmsel_jax.zoo``),
e.g. ``efficientnet-lite0,efficientnet-lite0@layer=-3``. Each candidate
trains in ``<--workdir>/<candidate>`` (resumed if interrupted; a finished run is evaluated again
without retraining) and the table goes to ``--a_score_output`` (CSV, plus JSON beside it). A line
per candidate is printed as it finishes, ``[2/5] <candidate>  A -3.2100  steps 100  loss 2.3100
(4.1 min; 8.0 min so far; about 12 min left)``, or ``(done before)`` for a run trained before.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags
from absl import logging

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import loop
from vlmsel_jax.training import progress as progress_lib

_CANDIDATES = flag_util.shared(flags.DEFINE_list, "vision_candidates", None, "Vision "
                               "candidates: specs with optional variants, e.g. "
                               "efficientnet-lite0@layer=-3,res=160.")
_OUTPUT = flags.DEFINE_string("a_score_output", None, "CSV table path (JSON written beside it).")

COLUMNS = ("candidate", "vision", "vision_layer", "a_score", "a_score_std", "pairs", "steps",
           "final_loss", "workdir")


def table_csv(rows: list[dict]) -> str:
  return atomic.csv_text(rows, COLUMNS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUTPUT.value:
    raise app.UsageError("--a_score_output is required (a CSV path)")
  runtime_flags.initialize_from_flags()
  if flags.FLAGS.stage != "1":
    raise app.UsageError("the A score is defined after stage-1 training; use --stage=1")
  # The candidates are the towers; the rest of train's flags apply to every run.
  candidates, names = train_flags.vision_candidates(_CANDIDATES.value)
  base = train_flags.config_from_flags()
  rows = []
  progress = progress_lib.Progress(len(candidates), enabled=parallel.is_primary())
  for spec, name in zip(candidates, names):
    config = dataclasses.replace(base, vision=spec,
                                 workdir=os.path.join(base.workdir, name.replace("/", "_")))
    vlm_config = config.vlm
    logging.info("candidate %s: stage 1 in %s", name, config.workdir)
    built = loop.build_model(config)
    summary = loop.train(config, built=built)
    scores = evaluate_run.evaluate(config, built=built, data=flags.FLAGS.eval_data,
                                   metrics=("a_score",),
                                   limit=flags.FLAGS.eval_limit or None,
                                   batch_size=flags.FLAGS.eval_batch_size)
    rows.append({"candidate": name, "vision": spec, "vision_layer": vlm_config.vision_layer,
                 "a_score": scores["a_score"], "a_score_std": scores["a_score_std"],
                 "pairs": scores["pairs"], "steps": summary.get("steps"),
                 "final_loss": loop.final_loss(config.workdir), "workdir": config.workdir})
    if parallel.is_primary():  # Rewritten after each candidate: a kill loses nothing finished.
      atomic.write_text_atomic(_OUTPUT.value, table_csv(rows))
      atomic.write_json_atomic(os.path.splitext(_OUTPUT.value)[0] + ".json", {"rows": rows})
    fields = [name, f"A {scores['a_score']:.4f}", f"steps {summary.get('steps')}"]
    if rows[-1]["final_loss"] is not None:
      fields.append(f"loss {rows[-1]['final_loss']:.4f}")
    # A run whose training was finished before is only evaluated again: no training time to
    # time, nor to count in the estimate of what is left.
    if summary.get("resumed_from", 0) >= config.max_steps:
      progress.done_before(fields)
    else:
      progress.done(fields)
  if parallel.is_primary():
    print(table_csv(rows))


def console_main():
  """The ``vlmsel-a-score`` console command."""
  app.run(main)


if __name__ == "__main__":
  console_main()
