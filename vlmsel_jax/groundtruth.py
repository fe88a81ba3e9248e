r"""Ground truth for encoder selection: train a VLM per candidate and measure what it learned.

  python -m vlmsel_jax.groundtruth --flagfile=studies/demo/demo_groundtruth.flags
  python -m vlmsel_jax.groundtruth --flagfile=studies/demo/demo_groundtruth.flags --seeds=1 \
      --vision_models=efficientnet-lite0,efficientnet-lite2   # seed-to-seed spread

For every vision candidate of ``--vision_models`` (a zoo spec with an optional variant,
``efficientnet-lite0@res=128``) and every seed of ``--seeds`` (default: ``--seed``): stage 1
(projector on captions), the A score on held-out captions, stage 2 (projector + LoRA on VQA,
from the stage-1 projector), and VQA accuracy on held-out questions, each stage with its own
budget (``--stage1_*`` / ``--stage2_*``); every other setting is the training binary's flag of
the same name (``vlmsel_jax.training.flags``), shared by all candidates. The tower layer is the
spec's own (``@layer=``), else ``--vision_layer``: to judge training-free scores, set it to the
layer they were extracted from (``-1`` by default), so that a candidate names the same features
in both.

Writes into ``--output_dir`` (``vlmsel_jax.training.groundtruth`` says what each file holds):
``groundtruth.csv`` (one row per candidate, what ``vlmsel_jax.score --ground_truth`` reads),
``groundtruth_runs.csv`` (one row per candidate and seed), ``groundtruth.json`` (the seed-to-seed
spread) and the runs under ``runs/<candidate>/seed<S>/``. The tables are rewritten after every
run; a re-run skips what is done and resumes a half-trained run from its checkpoint.

It prints a line per (candidate, seed) as it finishes: ``[3/26] <candidate>  seed 0  accuracy
0.4120  A -3.2100  (4.1 min; 12 min so far; about 1 h 32 min left)``, or ``(done before)`` for
one a re-run skips (``vlmsel_jax.training.progress``).

With ``--llm_models`` (LLM specs) every vision candidate trains with every LLM: the grid of
(encoder, LLM) pairs a selection method searches. A pair is named ``<vision>+<llm>`` (the zoo
names, variants included) in every table and run directory; without the flag the one
``--llm_model`` is used and a candidate is named by its vision spec alone.

With ``--curve_fractions`` (e.g. ``0.0625,0.125,0.25,0.5``) stage 2 also stops at each fraction
r of its steps, ``round(r · stage2_steps)``, and measures VQA accuracy there before going on
(the cosine schedule spans the whole budget and training continues from the checkpoint, so the
final model is the one an uninterrupted run gives). These learning curves go to
``groundtruth_curves_seed<S>.csv``, the table ``vlmsel_jax.select --method=mordal --curves``
replays; each point is kept in the stage-2 run directory (``curve.jsonl``, with its first few
greedy answers) as soon as it is measured, so a killed run resumes without measuring it again.
"""

from __future__ import annotations

import json
import shlex
import sys

from absl import app
from absl import flags

from vlmsel_jax.runtime import errors
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax.training import groundtruth as gt
from vlmsel_jax.training import progress as progress_lib

_VISION_MODELS = flag_util.shared(flags.DEFINE_list, "vision_models", [], "Vision candidates: "
                                  "specs with optional variants, e.g. "
                                  "efficientnet-lite0@layer=-3,res=160.")
_LLM_MODELS = flag_util.shared(flags.DEFINE_list, "llm_models", [], "LLM specs: every vision "
                               "candidate trains with each, as the candidate <vision>+<llm>. "
                               "Empty: the one --llm_model.")
_SEEDS = flag_util.shared(flags.DEFINE_list, "seeds", [], "Seeds: every candidate trains once "
                          "per seed (initialisation and data order). Empty: --seed alone.")
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


def _numbers(flag: flags.FlagHolder, kind: type, what: str) -> list:
  try:
    return [kind(x) for x in flag.value]
  except ValueError:
    raise app.UsageError(f"--{flag.name}: not {what}: {','.join(flag.value)}") from None


def options_from_flags() -> gt.Options:
  seeds = _numbers(_SEEDS, int, "integers") or [train_flags.SEED.value]
  if len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--seeds: give distinct seeds, got {','.join(_SEEDS.value)}")
  fractions = _numbers(_CURVE_FRACTIONS, float, "numbers")
  if any(not 0.0 < r < 1.0 for r in fractions):
    raise app.UsageError(f"--curve_fractions: each must be in (0, 1) (the full run is always "
                         f"measured), got {','.join(_CURVE_FRACTIONS.value)}")
  return gt.Options(
      stage1=gt.StageBudget(_STAGE1_STEPS.value, _STAGE1_LR.value, _STAGE1_BATCH.value,
                            _STAGE1_MAX_LEN.value, _STAGE1_WARMUP.value),
      stage2=gt.StageBudget(_STAGE2_STEPS.value, _STAGE2_LR.value, _STAGE2_BATCH.value,
                            _STAGE2_MAX_LEN.value, _STAGE2_WARMUP.value),
      seeds=tuple(seeds), a_limit=_A_LIMIT.value or None, vqa_limit=_VQA_LIMIT.value or None,
      eval_batch_size=train_flags.EVAL_BATCH.value, eval_data=train_flags.EVAL_DATA.value,
      curve_fractions=tuple(fractions),
      command="python -m vlmsel_jax.groundtruth " + " ".join(shlex.quote(a)
                                                            for a in sys.argv[1:]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  output_dir = train_flags.OUTPUT_DIR.value
  if not output_dir:
    raise app.UsageError("--output_dir is required (the tables and the runs go there)")
  options = options_from_flags()
  visions, vision_names = train_flags.vision_models(_VISION_MODELS.value)
  llms, llm_names = train_flags.llm_models(_LLM_MODELS.value)
  runtime_flags.initialize_from_flags()
  # Each candidate's recipe is the training flags' for its models; its runs go in its directory.
  candidates = {name: train_flags.config_from_flags(
      vision=vision, llm=llm, output_dir=gt.candidate_dir(output_dir, name))
      for name, vision, llm in gt.candidate_grid(visions, vision_names, llms, llm_names,
                                                 train_flags.LLM_MODEL.value)}
  progress = progress_lib.Progress(len(options.seeds) * len(candidates),
                                   enabled=parallel.is_primary())
  spread = gt.run(candidates, output_dir, options, progress=progress)
  if parallel.is_primary():
    print(json.dumps({"seed_spread": spread}))


def console_main():
  """The ``vlmsel-groundtruth`` console command."""
  errors.run(main, "groundtruth")


if __name__ == "__main__":
  console_main()
