"""Mordal's LLM similarity (METHODS §3, clustering step 2): LLMs compared through one vision
encoder's warm-up projector.

For a vision medoid and each LLM, a short stage-1 run trains the projector that maps the
encoder's image tokens into that LLM's embedding space (the warm-up projector; the run is the
training loop's, in ``<workdir>/<vision>+<llm>``, so it resumes and is skipped once done). The
same held-out images then go through encoder → projector → LLM, and each LLM's representation of
an image is its hidden state at ``layer`` averaged over the image-token positions. Linear CKA
between two LLMs' (n, d) representations is their similarity; the square matrix, one per medoid,
is what ``--llm_similarity=medoid=path`` of the Mordal search reads; ``similarity_report`` makes
one per medoid, as ``select --method=mordal_llm_similarity`` writes them.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.scores import cka
from vlmsel_jax.scoring import report
from vlmsel_jax.selection import mordal_live
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import evaluation
from vlmsel_jax.training import loop
from vlmsel_jax.training import progress as progress_lib
from vlmsel_jax.training import step as step_lib


def warmup_config(base: loop.TrainConfig, vision: str, llm: str, workdir: str
                  ) -> loop.TrainConfig:
  """``base``'s recipe as a stage-1 (projector only) run of ``vision`` + ``llm`` in
  ``<workdir>/<vision>+<llm>`` (tower layer: ``mordal_live.candidate_config``'s)."""
  return mordal_live.candidate_config(
      base, vision, llm, stage=1,
      workdir=mordal_live.workdir_of(workdir, mordal_live.candidate_name(vision, llm)))


@nnx.jit(static_argnames="layer")
def _image_token_means(model, pixels, input_ids, attention_mask, image_mask, layer: int):
  embeds = model.embed(pixels, input_ids, image_mask)
  hidden = model.llm(None, attention_mask, inputs_embeds=embeds).hidden_states[layer]
  weights = image_mask.astype(jnp.float32)[..., None]
  return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.sum(weights, axis=1)


def image_representations(built: loop.Built, params: Any, records: Sequence[dict], *,
                          layer: int = -2, batch_size: int = 16) -> np.ndarray:
  """(n, hidden) float64: each record's image through the VLM, the LLM's ``layer`` hidden state
  averaged over the image-token positions (the caption follows them; causal attention keeps it
  out)."""
  if not records:
    raise ValueError("LLM similarity: no images to represent")
  model = step_lib.model_from(built.graphdef, built.template, params, built.frozen)
  out = []
  for start in range(0, len(records), batch_size):
    rows = [built.builder.caption_inputs(r, train=False) for r in records[start:start + batch_size]]
    real = len(rows)
    rows += [rows[-1]] * (batch_size - real)  # one compiled shape; the copies are dropped
    batch = {k: np.stack([r[k] for r in rows]) for k in ("pixels", "input_ids", "attention_mask",
                                                         "image_mask")}
    feats = _image_token_means(model, batch["pixels"], batch["input_ids"],
                               batch["attention_mask"], batch["image_mask"], layer=layer)
    out.append(np.asarray(jax.device_get(feats), np.float64)[:real])
  return np.concatenate(out)


def llm_similarity(base: loop.TrainConfig, vision: str, llms: Sequence[str], workdir: str,
                   records: Sequence[dict], *, layer: int = -2, batch_size: int = 16,
                   train_source=None, progress: progress_lib.Progress | None = None
                   ) -> tuple[list[str], np.ndarray, dict[str, dict]]:
  """(LLM names, their linear-CKA matrix through ``vision``'s warm-up projectors, per-LLM run
  summaries).

  Args:
    base: The warm-up recipe (data, steps, learning rate, ...); its stage becomes 1 and its
      models and workdir are replaced per LLM.
    vision: The vision encoder (a cluster's medoid) every LLM sees through.
    llms: Two or more LLM specs, distinct.
    workdir: Where the warm-up runs go, one directory per (vision, LLM).
    records: The held-out paired records (image and caption) represented.
    train_source: Records to warm up on instead of opening ``base.data``.
    progress: Told of each LLM as its warm-up and representations are done (a line each:
      ``<vision>+<llm>``, warm-up steps, final loss); a warm-up trained before is ``done_before``.
  """
  llms = list(llms)
  if len(llms) < 2:
    raise ValueError(f"LLM similarity needs two or more LLMs, got {llms}")
  if len(set(llms)) != len(llms):
    raise ValueError(f"LLM similarity: an LLM is listed twice in {llms}")
  feats, runs = {}, {}
  for llm in llms:
    config = warmup_config(base, vision, llm, workdir)
    built = loop.build_model(config)  # once: the warm-up and the representations share it
    runs[llm] = loop.train(config, source=train_source, built=built)
    params, _ = evaluate_run.latest_params(config, built)
    feats[llm] = image_representations(built, params, records, layer=layer,
                                       batch_size=batch_size)
    if progress is not None:
      loss = loop.final_loss(config.workdir)
      fields = [mordal_live.candidate_name(vision, llm), f"warm-up {runs[llm].get('steps')} steps",
                None if loss is None else f"loss {loss:.4f}", f"{len(records)} images"]
      if runs[llm].get("resumed_from", 0) >= config.max_steps:  # Warmed up before.
        progress.done_before(fields)
      else:
        progress.done(fields)
  return llms, cka.linear_cka_matrix([feats[llm] for llm in llms]), runs


def held_out_records(spec: str, limit: int | None) -> list[dict]:
  """The paired test-split records of data ``spec`` that the evaluation uses (``limit`` of them,
  spread as the evaluation spreads them)."""
  from vlmsel_jax.data import registry  # pylint: disable=g-import-not-at-top
  source = registry.open_source(spec, kind="paired", split="test")
  return [source[i] for i in evaluation.evaluation_indices(len(source), limit)]


def csv_suffix(vision: str) -> str:
  """The suffix of the CSV of the LLM CKA through ``vision`` beside the result JSON (the medoid's
  spec with anything but letters, digits and ``._=-`` as ``_``)."""
  return "_" + re.sub(r"[^A-Za-z0-9._=-]+", "_", vision) + ".csv"


def similarity_report(base: loop.TrainConfig, visions: Sequence[str], llms: Sequence[str], *,
                      layer: int = -2, limit: int | None = None, batch_size: int = 16,
                      progress: progress_lib.Progress | None = None
                      ) -> tuple[dict[str, Any], dict[str, str]]:
  """``llm_similarity`` through each vision medoid of ``visions``, on ``limit`` held-out images of
  ``base.data``, warm-ups under ``base.workdir``; returns the JSON payload and one CSV per medoid
  (``csv_suffix`` → the matrix, for ``select --method=mordal --llm_similarity=medoid=path``)."""
  if not visions:
    raise ValueError("--vision_models is required (the vision medoids)")
  if len(llms) < 2:
    raise ValueError("--llm_models needs two or more LLMs")
  records = held_out_records(base.data, limit)
  payload: dict[str, Any] = {
      "llms": list(llms), "layer": layer, "images": len(records),
      "warmup_steps": base.max_steps, "data": base.data, "workdir": base.workdir, "vision": {}}
  csvs = {}
  for vision in visions:
    names, matrix, runs = llm_similarity(base, vision, llms, base.workdir, records, layer=layer,
                                         batch_size=batch_size, progress=progress)
    csvs[csv_suffix(vision)] = report.similarity_csv(names, matrix)
    # The tower layer the warm-ups saw: the medoid's own (@layer=), else --vision_layer; it must
    # be the layer the candidate of that name was trained with.
    vision_layer = warmup_config(base, vision, names[0], base.workdir).vlm.vision_layer
    payload["vision"][vision] = {
        "cka": matrix.tolist(), "csv_suffix": csv_suffix(vision), "vision_layer": vision_layer,
        "warmup_workdirs": {llm: runs[llm]["workdir"] for llm in names},
        "warmup_loss": {llm: loop.final_loss(runs[llm]["workdir"]) for llm in names}}
  return payload, csvs
