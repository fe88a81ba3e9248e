"""Two local processes × 4 CPU devices (jax.distributed on localhost) train like one process."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

import multiprocess_util
import vlm_fixtures as fx
from vlmsel_jax.models import vlm
from vlmsel_jax.training import checkpoint
from vlmsel_jax.training import loop
from vlmsel_jax.training import step as step_lib

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multiprocess_train_worker.py")


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_multiprocess_training_matches_single_process(tmp_path):
  llm_dir = fx.tiny_llm_dir(str(tmp_path / "llm"))
  vit_dir = fx.tiny_vit_dir(str(tmp_path / "vit"))
  address = f"localhost:{multiprocess_util.free_port()}"
  out = str(tmp_path / "multi.npz")
  results = multiprocess_util.run_processes(
      [[sys.executable, WORKER, address, "2", str(i), llm_dir, vit_dir, str(tmp_path / "multi"),
        out] for i in range(2)], devices=4, timeout=420, merge_stderr=True)
  for r in results:
    assert r.returncode == 0, r.stdout[-3000:]

  # The same run in this process, on 8 devices with the same mesh.
  config = loop.TrainConfig(
      vision=vit_dir, llm=llm_dir, stage=2, data="unused", workdir=str(tmp_path / "single"),
      vlm=vlm.VLMConfig(vision_layer=-2),
      optim=step_lib.OptimConfig(learning_rate=1e-2, schedule_steps=4, warmup_ratio=0.0),
      batch_size=8, max_steps=4, max_len=32, save_every=2, log_every=1,
      mesh="data:2,fsdp:4", progress=False)
  summary = loop.train(config, source=fx.shape_records(32, "vqa"))
  params, _ = checkpoint.restore_params(str(tmp_path / "single" / "checkpoints"))
  multi = np.load(out)
  np.testing.assert_allclose(float(multi["loss"]), summary["loss"], rtol=1e-5)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(flat) == len(multi.files) - 1
  for path, value in flat:
    np.testing.assert_allclose(multi[jax.tree_util.keystr(path)], np.asarray(value), rtol=1e-5,
                               atol=1e-6)
