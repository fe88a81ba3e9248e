r"""``--method=mordal_llm_similarity``: the LLM CKA matrices Mordal's LLM clustering reads.

  python -m vlmsel_jax.select --method=mordal_llm_similarity \
      --vision_models=efficientnet-lite0 --llm_models=smollm2-135m,gemma3-270m \
      --data=easy-vqa --max_steps=80 --output_dir=runs/llm_sim

For each vision medoid of ``--vision_models``, each LLM of ``--llm_models`` gets a warm-up
projector: a stage-1 run of ``vlmsel_jax.train``'s recipe (every flag of that binary applies,
``--max_steps`` is the warm-up length) in ``<--output_dir>/runs/<vision>+<llm>``, reused once
done. The LLMs are compared by linear CKA of their hidden states at the image tokens of
``--eval_limit`` held-out images (``selection/llm_similarity.py``).
Writes into ``--output_dir`` ``mordal_llm_similarity.json``, a markdown table and one CSV per
medoid, ``mordal_llm_similarity_<medoid>.csv``, for ``select --method=mordal
--llm_similarity=<medoid>=<that csv>``. A line is printed per (medoid, LLM) as its warm-up and
representations are done, counted over all of them, with an estimate of the time left.
"""

from __future__ import annotations

import os

from absl import flags

from vlmsel_jax import zoo
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.runtime import parallel
from vlmsel_jax.selection import llm_similarity
from vlmsel_jax.selection import reports
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax.training import progress as progress_lib

VISION_MODELS = flag_util.shared(
    flags.DEFINE_list, "vision_models", [], "Vision encoders (zoo names, local paths or Hub ids, "
    "optionally with a variant): dcd ranks them; mordal --mordal_live pairs each with every "
    "--llm_models; mordal_llm_similarity compares the LLMs through each.")
LLM_MODELS = flag_util.shared(
    flags.DEFINE_list, "llm_models", [], "LLMs (zoo names, local paths, .gguf files or Hub ids): "
    "mordal --mordal_live pairs each with every --vision_models; mordal_llm_similarity compares "
    "them (two or more).")
LAYER = flags.DEFINE_integer("llm_similarity_layer", -2, "LLM hidden state compared (index into "
                             "its hidden states).")


def run(method: str) -> dict:
  """Warms up every (medoid, LLM) pair, measures the LLM CKA per medoid, writes the files."""
  fv = flags.FLAGS
  visions, llms = list(VISION_MODELS.value), list(LLM_MODELS.value)
  if not visions:
    raise ValueError("--vision_models is required (the vision medoids)")
  if len(llms) < 2:
    raise ValueError("--llm_models needs two or more LLMs")
  # The recipe, as a run of the first models (the tower without its variant, so that the recipe's
  # layer is --vision_layer); each warm-up replaces the models, layer and directory.
  base = train_flags.config_from_flags(vision=zoo.base_spec(visions[0]), llm=llms[0],
                                       output_dir=os.path.join(fv.output_dir, "runs"))
  progress = progress_lib.Progress(len(visions) * len(llms), enabled=parallel.is_primary())
  payload, csvs = llm_similarity.similarity_report(
      base, visions, llms, layer=LAYER.value, limit=fv.eval_limit or None,
      batch_size=fv.eval_batch_size, progress=progress)
  reports.write_result_files(fv.output_dir, method, payload,
                             reports.llm_similarity_markdown(payload), extra=csvs)
  return payload
