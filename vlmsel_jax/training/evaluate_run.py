"""Evaluate a training run's latest checkpoint: the A score and/or VQA accuracy → eval.json.

The run is rebuilt from its checkpoint's meta (models, VLM config, stage, LoRA), so evaluating
needs only the workdir. Held-out data defaults to the test split of the run's training data.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import parallel
from vlmsel_jax.models import vlm as vlm_lib
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import evaluation
from vlmsel_jax.training import loop

METRICS = ("a_score", "vqa")
EVAL_FILE = "eval.json"


def config_from_meta(meta: dict, workdir: str) -> loop.TrainConfig:
  lora_meta = meta.get("lora") or {}
  return loop.TrainConfig(
      vision=meta["vision"], llm=meta["llm"], stage=int(meta["stage"]), data=meta["data"],
      workdir=workdir, vlm=vlm_lib.VLMConfig(**meta["vlm"]),
      lora_rank=lora_meta.get("rank", 8), lora_alpha=lora_meta.get("alpha", 16.0),
      lora_targets=tuple(lora_meta.get("targets", ())) or loop.TrainConfig.lora_targets,
      full_finetune=int(meta["stage"]) == 2 and not lora_meta, seed=int(meta.get("seed", 0)),
      max_len=int(meta["max_len"]), dtype=meta.get("dtype", "float32"),
      system_prompt=meta.get("system_prompt"), data_kind=meta.get("data_kind"))


def latest_params(config: loop.TrainConfig, built: loop.Built) -> tuple[Any, dict]:
  """(trained params as jax arrays, checkpoint meta) of ``config.workdir``'s latest checkpoint,
  checked against the run ``built`` is."""
  directory = os.path.join(config.workdir, loop.CHECKPOINT_DIR)
  params, meta = ckpt_lib.restore_params(directory)
  ckpt_lib.check_compatible(meta, config.meta(loop.shapes_of(built.params)), directory)
  return jax.tree.map(jax.numpy.asarray, ckpt_lib.conform(params, built.params)), meta


def evaluate(config: loop.TrainConfig, *, data: str | None = None, metrics=None,
             limit: int | None = None, batch_size: int = 16, max_new_tokens: int = 8,
             train_source=None, eval_source=None, progress: bool = True,
             built: loop.Built | None = None) -> dict:
  """Evaluates the latest checkpoint of ``config.workdir``; writes and returns eval.json."""
  from vlmsel_jax.data import registry  # pylint: disable=g-import-not-at-top
  metrics = tuple(metrics or (("a_score",) if config.stage == 1 else ("vqa",)))
  for m in metrics:
    if m not in METRICS:
      raise ValueError(f"unknown evaluation metric {m!r}; use {', '.join(METRICS)}")
  built = loop.build_model(config) if built is None else built
  params, meta = latest_params(config, built)
  model_fn = evaluation.model_fn_for(built.graphdef, built.template, params, built.frozen)
  spec = data or config.data
  out = {"workdir": config.workdir, "checkpoint_step": meta.get("step"), "data": spec}
  for metric in metrics:
    if metric == "a_score":
      source = eval_source if eval_source is not None else registry.open_source(
          spec, kind="paired", split="test")
      out.update(evaluation.a_score(model_fn, built.builder, source, batch_size=batch_size,
                                    limit=limit, progress=progress))
    else:
      source = eval_source if eval_source is not None else registry.open_source(
          spec, kind=config.kind(), split="test")
      train = train_source if train_source is not None else registry.open_source(
          config.data, kind=config.kind(), split="train")
      out.update(evaluation.vqa_accuracy(
          model_fn, built.builder, source, majority_answer=evaluation.majority_answer_of(train),
          batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit,
          progress=progress))
  if parallel.is_primary():
    atomic.write_json_atomic(os.path.join(config.workdir, EVAL_FILE), out)
  return out
