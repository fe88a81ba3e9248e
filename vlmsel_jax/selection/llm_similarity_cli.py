r"""``--method=mordal_llm_similarity``: the LLM CKA matrices Mordal's LLM clustering reads.

  python -m vlmsel_jax.select --method=mordal_llm_similarity \
      --llm_similarity_vision=efficientnet-lite0 --llm_similarity_llms=smollm2-135m,gemma3-270m \
      --data=easy-vqa --max_steps=80 --workdir=runs/llm_warmup --output=runs/llm_sim/llm.json

For each vision medoid, each LLM gets a warm-up projector (a stage-1 run of ``vlmsel_jax.train``'s
recipe: every flag of that binary applies, ``--max_steps`` is the warm-up length) and the LLMs
are compared by linear CKA of their hidden states at the image tokens of ``--eval_limit``
held-out images (``selection/llm_similarity.py``). Writes the JSON, a markdown table and one CSV
per medoid, ``<stem>_<medoid>.csv``, for ``select --method=mordal
--llm_similarity=<medoid>=<stem>_<medoid>.csv``. A line is printed per (medoid, LLM) as its
warm-up and representations are done, counted over all of them, with an estimate of the time left.
"""

from __future__ import annotations

import re

from absl import flags

from vlmsel_jax.runtime import parallel
from vlmsel_jax.scoring import report
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax.selection import evaluate
from vlmsel_jax.selection import llm_similarity
from vlmsel_jax.training import loop
from vlmsel_jax.training import progress as progress_lib

VISION = flags.DEFINE_list("llm_similarity_vision", [], "Vision encoders (cluster medoids) the "
                           "LLMs are compared through, one matrix each.")
LLMS = flags.DEFINE_list("llm_similarity_llms", [], "The LLMs to compare (two or more).")
LAYER = flags.DEFINE_integer("llm_similarity_layer", -2, "LLM hidden state compared (index into "
                             "its hidden states).")


def _csv_suffix(vision: str) -> str:
  return "_" + re.sub(r"[^A-Za-z0-9._=-]+", "_", vision) + ".csv"


def run(method: str) -> dict:
  del method
  fv = flags.FLAGS
  if not VISION.value:
    raise ValueError("--llm_similarity_vision is required (the vision medoids)")
  if len(LLMS.value) < 2:
    raise ValueError("--llm_similarity_llms needs two or more LLMs")
  if not fv.workdir:
    raise ValueError("--workdir is required (the warm-up runs go there)")
  fv.vision = fv.vision or VISION.value[0]
  fv.llm = fv.llm or LLMS.value[0]
  base = train_flags.config_from_flags()
  records = llm_similarity.held_out_records(base.data, fv.eval_limit or None)
  payload = {"llms": list(LLMS.value), "layer": LAYER.value, "images": len(records),
             "warmup_steps": base.max_steps, "data": base.data, "workdir": base.workdir,
             "vision": {}}
  extra = {}
  lines = ["# Mordal LLM similarity (linear CKA through warm-up projectors)", "",
           f"{len(records)} held-out images of `{base.data}`; LLM hidden state {LAYER.value} "
           f"averaged over the image tokens; warm-up: {base.max_steps} stage-1 steps.", ""]
  progress = progress_lib.Progress(len(VISION.value) * len(LLMS.value),
                                  enabled=parallel.is_primary())
  for vision in VISION.value:
    names, matrix, runs = llm_similarity.llm_similarity(
        base, vision, LLMS.value, base.workdir, records, layer=LAYER.value,
        batch_size=fv.eval_batch_size, progress=progress)
    extra[_csv_suffix(vision)] = report.similarity_csv(names, matrix)
    # The tower layer the warm-ups saw: the medoid's own (@layer=), else --vision_layer; it must
    # be the layer the candidate of that name was trained with.
    warmup = llm_similarity.warmup_config(base, vision, names[0], base.workdir)
    vision_layer = warmup.vlm.vision_layer
    payload["vision"][vision] = {
        "cka": matrix.tolist(), "csv_suffix": _csv_suffix(vision), "vision_layer": vision_layer,
        "warmup_workdirs": {llm: runs[llm]["workdir"] for llm in names},
        "warmup_loss": {llm: loop.final_loss(runs[llm]["workdir"]) for llm in names}}
    lines += [f"## Through `{vision}` (tower layer {vision_layer})", "",
              "| | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
              for a, row in zip(names, matrix)]
    lines.append("")
  evaluate.write_result_files(fv.output, payload, "\n".join(lines), None, extra=extra)
  return payload
