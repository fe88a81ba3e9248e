"""One process of the 2-process training test (tests/training/test_train_multiprocess.py).

argv: coordinator_address num_processes process_id llm_dir vit_dir workdir out_npz
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import vlm_fixtures as fx  # noqa: E402
from vlmsel_jax.runtime import parallel  # noqa: E402
from vlmsel_jax.models import vlm  # noqa: E402
from vlmsel_jax.training import loop  # noqa: E402
from vlmsel_jax.training import step as step_lib  # noqa: E402


def main():
  address, count, index, llm_dir, vit_dir, workdir, out = sys.argv[1:]
  parallel.initialize(coordinator_address=address, num_processes=int(count),
                      process_id=int(index))
  config = loop.TrainConfig(
      vision=vit_dir, llm=llm_dir, stage=2, data="unused", workdir=workdir,
      vlm=vlm.VLMConfig(vision_layer=-2),
      optim=step_lib.OptimConfig(learning_rate=1e-2, schedule_steps=4, warmup_ratio=0.0),
      batch_size=8, max_steps=4, max_len=32, save_every=2, log_every=1,
      mesh="data:2,fsdp:4", progress=False)
  summary = loop.train(config, source=fx.shape_records(32, "vqa"))
  from vlmsel_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  # Every process takes part: orbax synchronises the processes when it opens a checkpoint.
  params, _ = checkpoint.restore_params(os.path.join(workdir, "checkpoints"))
  if jax.process_index() == 0:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out, loss=summary["loss"],
             **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices("results written")


if __name__ == "__main__":
  main()
