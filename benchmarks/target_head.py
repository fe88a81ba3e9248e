"""Stage-2 train step with the LM head at every position vs only at the target positions.

  python benchmarks/target_head.py --llm_model=gemma3-270m --vision_model=hog@res=32

Builds the ground truth's stage-2 VLM (projector + LoRA r 8, one mean image token, easy-VQA
chat turns, batch 8, 36 tokens), then times the same jitted step twice in one process: the
default loss (``max_targets=0``: logits at all 36 positions) and ``gathered_token_loss``
(``max_targets`` = the batch's most targets per row). Checks the two losses agree first; prints
seconds per step for each and the speed-up. Times exclude compilation (best of ``--steps``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from vlmsel_jax.data import registry
from vlmsel_jax.models import vlm
from vlmsel_jax.training import loop
from vlmsel_jax.training import step as step_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--llm_model", default="gemma3-270m")
  parser.add_argument("--vision_model", default="hog@res=32")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--max_len", type=int, default=36)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()

  config = loop.TrainConfig(
      vision=args.vision_model, llm=args.llm_model, stage=2, data="easy-vqa",
      workdir=tempfile.mkdtemp(),
      vlm=vlm.VLMConfig(vision_layer=loop.tower_layer(args.vision_model, -1),
                        image_tokens="mean"),
      batch_size=args.batch_size, max_len=args.max_len, system_prompt="Answer briefly.",
      progress=False)
  built = loop.build_model(config)
  source = registry.open_source("easy-vqa", kind="vqa", split="train")
  rows = [built.builder.chat_inputs(source[i]) for i in range(args.batch_size)]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["mask"] = np.ones(args.batch_size, bool)
  k = step_lib.count_targets(batch["loss_mask"])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  tx = step_lib.OptimConfig(learning_rate=2e-4, schedule_steps=100).make()
  frozen_sh = step_lib.tree_shardings(built.frozen, mesh)
  frozen = jax.device_put(built.frozen, frozen_sh)
  gb = step_lib.global_batch(batch, mesh)

  results = {}
  for label, max_targets in (("every position", 0), (f"{k} target positions", k)):
    state, state_sh = step_lib.init_state(built.params, tx, mesh)
    fn = step_lib.make_train_step(built.graphdef, built.template, tx, mesh, state_sh, frozen_sh,
                                  {n: v.sharding for n, v in gb.items()},
                                  max_targets=max_targets)
    state, metrics = fn(state, frozen, gb)  # Compiles.
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(args.steps):
      tic = time.perf_counter()
      state, metrics = fn(state, frozen, gb)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - tic)
    results[label] = (first_loss, min(times))
    print(f"{label:>22}: loss {first_loss:.6f}, {min(times):.3f} s/step")
  (full_loss, full_t), (gathered_loss, gathered_t) = results.values()
  assert abs(full_loss - gathered_loss) <= 1e-5 * abs(full_loss), (full_loss, gathered_loss)
  print(f"{args.llm_model}, {args.batch_size} x {args.max_len} tokens, at most {k} targets a row: "
        f"{full_t / gathered_t:.2f}x faster")


if __name__ == "__main__":
  main()
