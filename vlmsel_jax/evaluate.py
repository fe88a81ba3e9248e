r"""Evaluate a trained VLM run: ``python -m vlmsel_jax.evaluate --output_dir=runs/lite0_s2``.

Reads the run's latest checkpoint (its meta says which models and VLM config), computes the A
score (mean per-token caption log-likelihood, METHODS §4) and/or VQA accuracy with the
majority-answer baseline, and writes ``eval.json`` into the run's directory
(``--output_dir``, the one ``train`` wrote).
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app
from absl import flags

from vlmsel_jax.runtime import errors
from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import evaluate_run
from vlmsel_jax.training import loop
from vlmsel_jax.training import run_flags

_OUTPUT_DIR = run_flags.OUTPUT_DIR
_DATA = run_flags.EVAL_DATA
_METRICS = flags.DEFINE_list("eval_metrics", None, "a_score and/or vqa (default: a_score for a "
                             "stage-1 run, vqa for stage 2).")
_LIMIT = run_flags.EVAL_LIMIT
_BATCH = run_flags.EVAL_BATCH
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "Longest decoded answer.", lower_bound=1)
_SYSTEM = run_flags.SYSTEM_PROMPT


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _OUTPUT_DIR.value:
    raise app.UsageError("--output_dir is required (the run's directory)")
  runtime_flags.initialize_from_flags()
  directory = os.path.join(_OUTPUT_DIR.value, loop.CHECKPOINT_DIR)
  # Looked up without a checkpoint manager, which would create the directory it manages.
  if ckpt_lib.latest_step(directory) is None:
    raise ValueError(f"{directory}: no checkpoint to evaluate")
  checkpointer = ckpt_lib.Checkpointer(directory, save_every=1, keep=1)
  step = checkpointer.latest_step()
  meta = checkpointer.read_meta(step)
  checkpointer.close()
  config = evaluate_run.config_from_meta(meta, _OUTPUT_DIR.value)
  if _SYSTEM.value is not None:
    config = dataclasses.replace(config, system_prompt=_SYSTEM.value)
  out = evaluate_run.evaluate(config, data=_DATA.value, metrics=_METRICS.value,
                              limit=_LIMIT.value or None, batch_size=_BATCH.value,
                              max_new_tokens=_MAX_NEW.value)
  if parallel.is_primary():
    print(json.dumps({k: v for k, v in out.items() if k != "examples"}, indent=1))


def console_main():
  """The ``vlmsel-evaluate`` console command."""
  errors.run(main, "evaluate")


if __name__ == "__main__":
  console_main()
