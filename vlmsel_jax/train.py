r"""Train a LLaVA-style VLM: ``python -m vlmsel_jax.train --flagfile=configs/train_stage1.flags``.

Stage 1 trains the projector on image–caption pairs; stage 2 the projector and LoRA adapters (or
the whole LLM with ``--full_finetune``) on instruction / VQA data, usually starting from a stage-1
run (``--init_from=<stage-1 output_dir>``). A run lives in ``--output_dir``: ``checkpoints/``
(orbax, resumed automatically when present, from the newest intact step: a damaged latest step
is skipped with a warning), ``metrics.jsonl``, ``summary.json`` and, with ``--eval``,
``eval.json``. Running a finished run's command again trains nothing and rewrites ``summary.json``
with the loss, grad norm and learning rate the run recorded. Re-running with a larger ``--max_steps`` continues the same run
(successive halving reuses runs this way). The recipe's flags are ``vlmsel_jax.training.flags``.

  python -m vlmsel_jax.train --vision_model=efficientnet-lite0 --llm_model=smollm2-135m \
      --stage=1 --data=easy-vqa --output_dir=runs/lite0_s1 --max_steps=200
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging

from vlmsel_jax.runtime import errors
from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import flag_util
from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import flags as runtime_flags
from vlmsel_jax.training import flags as train_flags
from vlmsel_jax.training import loop

_VISION_MODEL = flag_util.shared(
    flags.DEFINE_string, "vision_model", None, "Vision tower: a zoo name, a local model path or "
    "a Hugging Face Hub id, optionally with a variant: efficientnet-lite0@layer=-3,res=160 (its "
    "layer wins over --vision_layer).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime_flags.initialize_from_flags()
  config = train_flags.config_from_flags(vision=_VISION_MODEL.value,
                                         llm=train_flags.LLM_MODEL.value)
  # Built once: training and the evaluation after it share the loaded models.
  built = loop.build_model(config)
  summary = loop.train(config, built=built)
  if train_flags.EVAL.value:
    from vlmsel_jax.training import evaluate_run  # pylint: disable=g-import-not-at-top
    summary["eval"] = evaluate_run.evaluate(config, built=built, data=train_flags.EVAL_DATA.value,
                                            limit=train_flags.EVAL_LIMIT.value or None,
                                            batch_size=train_flags.EVAL_BATCH.value)
  if parallel.is_primary():
    atomic.write_json_atomic(os.path.join(config.workdir, "summary.json"), summary)
    logging.info("%s", json.dumps({k: v for k, v in summary.items() if k != "eval"}))
    if "eval" in summary:
      print(json.dumps({k: v for k, v in summary["eval"].items() if k != "examples"}, indent=1))


def console_main():
  """The ``vlmsel-train`` console command."""
  errors.run(main, "train")


if __name__ == "__main__":
  console_main()
