r"""``--method=dcd``: Directional Conductance Divergence, leave-one-task-out.

  python -m vlmsel_jax.select --method=dcd --vision_models=/models/vit_a,/models/clip_b \
      --dcd_tasks=shapes=data/shapes,colors=data/colors,... --ground_truth=accuracy.csv \
      --output_dir=runs/dcd
  python -m vlmsel_jax.select --method=dcd --dcd_conductance=runs/dcd/dcd_conductance.csv \
      --ground_truth=accuracy.csv --output_dir=runs/dcd2    # reuse computed profiles

The models are vision towers: vision transformers (zoo names or Hugging Face directories; DCD
is defined on transformer blocks) or EfficientNet-Lite (``efficientnet-lite0`` and its
variants, e.g. ``efficientnet-lite1@res=128``), whose blocks are its MBConv blocks; each task is
an image folder. ``--ground_truth`` is a CSV ``candidate,task,accuracy`` whose candidates are the
models' names. Writes into ``--output_dir``: ``dcd.json``, ``dcd.md``, ``dcd.png``,
``dcd_conductance.csv`` (model,task,block,conductance: the profiles, reusable with
--dcd_conductance) and ``dcd_scores.csv`` (candidate,task,score with score = −predicted rank, the
format ``--method=judge`` reads).
"""

from __future__ import annotations

import time

from absl import flags

from vlmsel_jax.runtime import flag_util
from vlmsel_jax.selection import dcd
from vlmsel_jax.selection import figures
from vlmsel_jax.selection import judge
from vlmsel_jax.selection import reports
from vlmsel_jax.selection import tables

VISION_MODELS = flag_util.shared(
    flags.DEFINE_list, "vision_models", [], "Vision encoders (zoo names, local paths or Hub ids, "
    "optionally with a variant): dcd ranks them; mordal --mordal_live pairs each with every "
    "--llm_models; mordal_llm_similarity compares the LLMs through each.")
GROUND_TRUTH = flag_util.shared(
    flags.DEFINE_string, "ground_truth", None, "Ground-truth CSV: columns candidate, task and "
    "--ground_truth_column (accuracy ≥ 0: it is NDCG's gain). judge judges the scores against "
    "it; dcd ranks the models by it.")
GROUND_TRUTH_COLUMN = flag_util.shared(flags.DEFINE_string, "ground_truth_column", "accuracy",
                                       "Column of --ground_truth holding the accuracy.")
TASKS = flags.DEFINE_list("dcd_tasks", [], "Tasks as name=image_folder, one per task.")
CONDUCTANCE = flags.DEFINE_string(
    "dcd_conductance", None, "CSV model,task,block,conductance of precomputed profiles, instead "
    "of --vision_models/--dcd_tasks.")
IMAGES_PER_TASK = flags.DEFINE_integer("dcd_images_per_task", 16, "Images of each task the "
                                       "profile averages over (a --seed'ed subset; 0 = all).",
                                       lower_bound=0)
STEPS = flags.DEFINE_integer("dcd_steps", 50, "Integration steps of the layer conductance.",
                             lower_bound=1)
QUADRATURE = flags.DEFINE_enum("dcd_quadrature", "gausslegendre", list(dcd.QUADRATURES),
                               "Integration rule (Captum's names; gausslegendre is its default).")
EMBEDDING = flags.DEFINE_enum("dcd_embedding", "pooler", list(dcd.EMBEDDINGS),
                              "Image embedding whose L2 norm is attributed: the model's pooler "
                              "output, or the CLS token / patch mean of its final hidden state.")
BATCH_SIZE = flags.DEFINE_integer("dcd_batch_size", 8, "Images per conductance batch.",
                                  lower_bound=1)
ETA = flags.DEFINE_float("dcd_eta", dcd.ETA, "Temperature η of the block importance softmax.")
GAMMA = flags.DEFINE_float("dcd_gamma", dcd.GAMMA, "Sharpness γ of the source weights.")


def _profile_options() -> dcd.ProfileOptions:
  return dcd.ProfileOptions(images_per_task=IMAGES_PER_TASK.value, steps=STEPS.value,
                            quadrature=QUADRATURE.value, embedding=EMBEDDING.value,
                            batch_size=BATCH_SIZE.value, seed=flags.FLAGS.seed)


def run(method: str) -> dict:
  """Profiles (computed or read) + accuracies → leave-one-task-out DCD; writes the outputs."""
  if not GROUND_TRUTH.value:
    raise dcd.DCDError("--ground_truth is required (CSV candidate,task,accuracy)")
  if CONDUCTANCE.value and (VISION_MODELS.value or TASKS.value):
    raise dcd.DCDError("--dcd_conductance replaces --vision_models/--dcd_tasks; give one or the "
                       "other")
  accuracy = judge.read_truth(GROUND_TRUTH.value, GROUND_TRUTH_COLUMN.value)
  options = _profile_options()
  start = time.time()
  if CONDUCTANCE.value:
    profiles = tables.read_profiles(CONDUCTANCE.value)
  else:
    if not VISION_MODELS.value or not TASKS.value:
      raise dcd.DCDError("--vision_models and --dcd_tasks are required (or --dcd_conductance)")
    profiles = dcd.compute_profiles(list(VISION_MODELS.value), list(TASKS.value), options)
  run_info = {"ground_truth": GROUND_TRUTH.value, "profiles": CONDUCTANCE.value or "computed",
              "steps": options.steps, "quadrature": options.quadrature,
              "embedding": options.embedding, "images_per_task": options.images_per_task,
              "eta": ETA.value, "gamma": GAMMA.value, "seed": options.seed,
              "profile_seconds": round(time.time() - start, 1)}
  payload = dcd.report(profiles, accuracy, eta=ETA.value, gamma=GAMMA.value,
                       ks=judge.cutoffs(flags.FLAGS.k), run=run_info)
  reports.write_result_files(
      flags.FLAGS.output_dir, method, payload, reports.dcd_markdown(payload),
      lambda path: figures.dcd_profiles(payload, path),
      extra={"_conductance.csv": tables.profiles_csv(profiles),
             "_scores.csv": tables.scores_csv(payload["dcd"])})
  return payload
