r"""Scores candidate encoders against an LLM's text features, without training.

  python -m vlmsel_jax.score --flagfile=configs/demo.flags
  python -m vlmsel_jax.score --banks=a.safetensors,b.npz --text_bank=llm.safetensors \
      --metrics=gw,cka --ground_truth=accuracy.csv --output_dir=runs/score
  python -m vlmsel_jax.score --vision_models=/models/clip-vit-b32,/models/dinov2-small \
      --text_model=smollm2-135m --data_dir=data/pairs --cache_dir=banks --output_dir=runs/score

Writes scores.csv, scores.json, report.md and scores.png into --output_dir (atomically), and
vision_cka.csv / vision_cka.png: the candidates' linear CKA with one another, the vision
similarity Mordal clusters by (``vlmsel_jax.select --method=mordal --vision_similarity``).
--output_dir and
--cache_dir (and --ground_truth) may be bucket paths (``gs://bucket/run``: any ``etils.epath``
URI; see ``vlmsel_jax.runtime.atomic``). The work is ``vlmsel_jax.scoring.pipeline.run``; the
metric flags are ``vlmsel_jax.scoring.flags``', the C-score flags
``vlmsel_jax.scoring.c_score_flags``', the interval flags (--bootstrap, --permutations,
--confidence) ``vlmsel_jax.scoring.uncertainty_flags``'.

On several hosts (a TPU pod slice, or --coordinator_address/--num_processes/--process_id),
every process runs the same command: GW candidates are sharded over the devices of all hosts,
each process solves its own, results are gathered, and only process 0 writes --output_dir.
"""

from __future__ import annotations

from absl import app
from absl import flags

from vlmsel_jax.runtime import errors
from vlmsel_jax.features import flags as data_flags
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax.scoring import c_score_flags
from vlmsel_jax.scoring import flags as scoring_flags
from vlmsel_jax.scoring import pipeline
from vlmsel_jax.scoring import uncertainty_flags


BANKS = flags.DEFINE_list(
    "banks", [], "Candidate feature banks (.safetensors or .npz with 'features' n×d and 'ids'), "
    "one per candidate encoder.")
BANK_NAMES = flags.DEFINE_list(
    "bank_names", [], "Names for the candidates (default: the bank's 'name' metadata, else its "
    "file name).")
TEXT_BANK = flags.DEFINE_string("text_bank", None, "The text feature bank (the LLM's features "
                                "of the paired captions); rows are paired with the candidates' "
                                "by 'ids'.")
SYNTHETIC_POOL = flags.DEFINE_bool(
    "synthetic_pool", False, "Score the built-in synthetic pool (vlmsel_jax.scoring.synthetic) "
    "instead of feature banks: candidates with graded damage to a shared latent, so the right "
    "ranking is known and is used as ground truth.")
SYNTHETIC_N = flags.DEFINE_integer("synthetic_n", 500, "Samples in the synthetic pool.",
                                   lower_bound=4)
SEED = flag_util.shared(flags.DEFINE_integer, "seed", 0, "Seed of every random choice "
                        "(scoring: synthetic pool, minibatch order, bootstrap and permutation "
                        "draws).")
GROUND_TRUTH = flag_util.shared(
    flags.DEFINE_string, "ground_truth", None, "CSV with columns 'candidate' and "
    "--ground_truth_column (e.g. trained VLM accuracy); adds the table of every score's "
    "agreement with it.")
GROUND_TRUTH_COLUMN = flag_util.shared(flags.DEFINE_string, "ground_truth_column", "accuracy",
                                       "Column of --ground_truth holding the accuracy.")
GROUND_TRUTH_SCORES = flags.DEFINE_list(
    "ground_truth_scores", [], "Columns of --ground_truth that hold scores measured with the "
    "ground truth and judged like the others (a_score: the A score of the stage-1 projectors the "
    "ground-truth runs trained); higher is better.")
OUTPUT_DIR = flag_util.shared(flags.DEFINE_string, "output_dir", None, "Where results are "
                              "written.")
PROGRESS = flag_util.shared(flags.DEFINE_bool, "progress", True, "Show a progress bar.")
VISION_MODELS = flag_util.shared(
    flags.DEFINE_list, "vision_models", [], "Candidate encoders as model specs (zoo names, local "
    "Hugging Face directories or Hub ids such as openai/clip-vit-base-patch16) instead of "
    "--banks: their banks are extracted into --cache_dir first (or reused when up to date), with "
    "the default layer and pooling of vlmsel_jax.extract.")
TEXT_MODEL = flag_util.shared(
    flags.DEFINE_string, "text_model", None, "The LLM as a model spec (zoo name, Hugging Face "
    "directory, .gguf file or Hub id such as Qwen/Qwen2.5-0.5B-Instruct) instead of "
    "--text_bank; goes with --vision_models.")
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Where the banks extracted for "
                                "--vision_models / --text_model (and their C scores) are kept "
                                "and reused.")


def config() -> pipeline.ScoreConfig:
  """The flags as the pipeline's config."""
  return pipeline.ScoreConfig(
      output_dir=OUTPUT_DIR.value, banks=BANKS.value, bank_names=BANK_NAMES.value,
      text_bank=TEXT_BANK.value, synthetic_pool=SYNTHETIC_POOL.value,
      synthetic_n=SYNTHETIC_N.value, vision_models=VISION_MODELS.value,
      text_model=TEXT_MODEL.value, data=data_flags.source(),
      max_samples=data_flags.MAX_SAMPLES.value, cache_dir=CACHE_DIR.value,
      c_score_pairs=c_score_flags.C_SCORE_PAIRS.value,
      c_score_options=c_score_flags.record_options(SEED.value),
      metrics=scoring_flags.METRICS.value, settings=scoring_flags.settings(SEED.value),
      ground_truth=GROUND_TRUTH.value, ground_truth_column=GROUND_TRUTH_COLUMN.value,
      ground_truth_scores=GROUND_TRUTH_SCORES.value,
      uncertainty=uncertainty_flags.options(SEED.value,
                                            gw_bootstrap=scoring_flags.GW_BOOTSTRAP.value),
      progress=PROGRESS.value)


def run() -> list[str]:
  """The binary's body: flags → config → ``pipeline.run``. Returns the written paths."""
  return pipeline.run(config())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime_flags.initialize_from_flags()
  written = run()
  for path in written:
    print(path)


def console_main():
  """The ``vlmsel-score`` console command."""
  errors.run(main, "score")


if __name__ == "__main__":
  console_main()
