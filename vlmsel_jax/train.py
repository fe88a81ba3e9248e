r"""Train a LLaVA-style VLM: ``python -m vlmsel_jax.train --flagfile=configs/train_stage1.flags``.

Stage 1 trains the projector on image–caption pairs; stage 2 the projector and LoRA adapters (or
the whole LLM with ``--full_finetune``) on instruction / VQA data, usually starting from a stage-1
run (``--init_from=<stage-1 workdir>``). A run lives in ``--workdir``: ``checkpoints/`` (orbax,
resumed automatically when present), ``metrics.jsonl`` and, with ``--eval``, ``eval.json``.
Re-running with a larger ``--max_steps`` continues the same run (successive halving reuses runs
this way).

  python -m vlmsel_jax.train --vision=efficientnet-lite0 --llm=smollm2-135m --stage=1 \
      --data=easy-vqa --workdir=runs/lite0_s1 --max_steps=200
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import logging

from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import flags as runtime_flags  # noqa: F401  (defines the multi-process flags)
from vlmsel_jax.training import loop
from vlmsel_jax.training import flags as train_flags


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime_flags.initialize_from_flags()
  config = train_flags.config_from_flags()
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
  app.run(main)


if __name__ == "__main__":
  console_main()
