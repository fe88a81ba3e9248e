r"""A score over a candidate list (METHODS §4): stage-1 training per candidate, then the held-out
caption log-likelihood, written as one table.

  python -m vlmsel_jax.a_score --flagfile=configs/a_score_demo.flags

Takes every recipe flag of ``vlmsel_jax.train`` (``vlmsel_jax.training.flags``: the stage-1
recipe, shared by all candidates, with ``--llm_model``) plus ``--vision_models``: vision specs,
each optionally with a variant (``@layer=-3``, ``@res=160``: the Law paper treats layer and
resolution choices as distinct settings; see ``vlmsel_jax.zoo``), e.g.
``efficientnet-lite0,efficientnet-lite0@layer=-3``; a spec's own layer wins over
``--vision_layer``. In ``--output_dir``: each candidate trains in ``runs/<candidate>`` (resumed
if interrupted; a finished run is evaluated again without retraining) and the table is
``a_scores.csv`` (plus ``a_scores.json``; ``vlmsel_jax.training.a_score_runs``). A line per
candidate is printed as it finishes, ``[2/5] <candidate>  A -3.2100  steps 100  loss 2.3100
(4.1 min; 8.0 min so far; about 12 min left)``, or ``(done before)`` for a run trained before.
"""

from __future__ import annotations

from absl import app
from absl import flags

from vlmsel_jax.runtime import errors
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax.training import a_score_runs
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax.training import progress as progress_lib

_VISION_MODELS = flag_util.shared(flags.DEFINE_list, "vision_models", [], "Vision candidates: "
                                  "specs with optional variants, e.g. "
                                  "efficientnet-lite0@layer=-3,res=160.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  output_dir = train_flags.OUTPUT_DIR.value
  if not output_dir:
    raise app.UsageError("--output_dir is required (the table and the runs go there)")
  runtime_flags.initialize_from_flags()
  specs, names = train_flags.vision_models(_VISION_MODELS.value)
  # The candidates are the towers; the rest of train's flags apply to every run.
  configs = {name: train_flags.config_from_flags(
      vision=spec, llm=train_flags.LLM_MODEL.value,
      output_dir=a_score_runs.run_dir(output_dir, name)) for spec, name in zip(specs, names)}
  if next(iter(configs.values())).stage != 1:
    raise app.UsageError("the A score is defined after stage-1 training; use --stage=1")
  rows = a_score_runs.score_candidates(
      configs, output_dir, eval_data=train_flags.EVAL_DATA.value,
      limit=train_flags.EVAL_LIMIT.value or None, batch_size=train_flags.EVAL_BATCH.value,
      progress=progress_lib.Progress(len(configs), enabled=parallel.is_primary()))
  if parallel.is_primary():
    print(a_score_runs.table_csv(rows))


def console_main():
  """The ``vlmsel-a-score`` console command."""
  errors.run(main, "a_score")


if __name__ == "__main__":
  console_main()
