"""Mordal's LLM similarity through warm-up projectors, on tiny random models.

Reference: linear CKA (itself tested against NumPy) of image representations recomputed here
from the warm-up runs' checkpoints by an independent path (the VLM's logits-free forward, pooled
with NumPy).
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
from absl import flags

import vlm_fixtures as fx
from vlmsel_jax import select
from vlmsel_jax.models import vlm
from vlmsel_jax.scores import cka
from vlmsel_jax.selection import llm_similarity
from vlmsel_jax.selection import tables
from vlmsel_jax.training import checkpoint as ckpt_lib
from vlmsel_jax.training import loop
from vlmsel_jax.training import step as step_lib

FLAGS = flags.FLAGS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("llm_sim")
  return {"vit": fx.tiny_vit_dir(str(root / "vit")),
          "llama": fx.tiny_llm_dir(str(root / "llama")),
          "llama_b": fx.tiny_llm_dir(str(root / "llama_b"), seed=1),
          "gemma3": fx.tiny_gemma3_dir(str(root / "gemma3"))}


def _base(models, workdir):
  return loop.TrainConfig(
      vision=models["vit"], llm=models["llama"], stage=1, data="unused", workdir=str(workdir),
      vlm=vlm.VLMConfig(vision_layer=-2),
      optim=step_lib.OptimConfig(learning_rate=1e-2, schedule_steps=4, warmup_ratio=0.0),
      batch_size=8, max_steps=4, max_len=32, save_every=4, log_every=2,
      mesh="data:-1,fsdp:1", progress=False)


def test_llm_similarity_is_cka_of_each_llms_image_token_states(models, tmp_path):
  records = [fx.shape_records(24, "paired", seed=5)[i] for i in range(24)]
  train = fx.shape_records(32, "paired")
  llms = [models["llama"], models["llama_b"], models["gemma3"]]
  names, matrix, runs = llm_similarity.llm_similarity(
      _base(models, tmp_path), models["vit"], llms, str(tmp_path), records, batch_size=16,
      train_source=train)
  assert names == llms and matrix.shape == (3, 3)
  np.testing.assert_allclose(np.diag(matrix), 1.0)
  np.testing.assert_allclose(matrix, matrix.T)
  assert all(runs[m]["steps"] == 4 for m in llms)  # each LLM got its own warm-up run
  # Independent recomputation from the checkpoints: hidden states at the image tokens, pooled in
  # NumPy.
  feats = []
  for llm in llms:
    config = llm_similarity.warmup_config(_base(models, tmp_path), models["vit"], llm,
                                          str(tmp_path))
    built = loop.build_model(config)
    params, _ = ckpt_lib.restore_params(os.path.join(config.workdir, loop.CHECKPOINT_DIR))
    params = jax.tree.map(jax.numpy.asarray, ckpt_lib.conform(params, built.params))
    model = step_lib.model_from(built.graphdef, built.template, params, built.frozen)
    rows = []
    for r in records:
      x = built.builder.caption_inputs(r, train=False)
      batch = {k: x[k][None] for k in ("pixels", "input_ids", "attention_mask", "image_mask")}
      embeds = model.embed(batch["pixels"], batch["input_ids"], batch["image_mask"])
      hidden = np.asarray(model.llm(None, batch["attention_mask"],
                                    inputs_embeds=embeds).hidden_states[-2][0])
      rows.append(hidden[x["image_mask"]].mean(0))
    feats.append(np.asarray(rows, np.float64))
  for i in range(3):
    for j in range(3):
      assert matrix[i, j] == pytest.approx(cka.linear_cka(feats[i], feats[j]), abs=1e-5)
  # The projector matters: the warm-up changed it, and with it the representations.
  assert not np.allclose(matrix[0, 2], 1.0)


def test_llm_similarity_rejects_fewer_than_two_or_repeated_llms(models, tmp_path):
  with pytest.raises(ValueError, match=r"two or more LLMs"):
    llm_similarity.llm_similarity(_base(models, tmp_path), models["vit"], [models["llama"]],
                                  str(tmp_path), [])
  with pytest.raises(ValueError, match=r"listed twice"):
    llm_similarity.llm_similarity(_base(models, tmp_path), models["vit"],
                                  [models["llama"], models["llama"]], str(tmp_path), [])


def test_select_binary_writes_a_matrix_the_mordal_search_reads(models, tmp_path, monkeypatch,
                                                               capsys):
  records = [fx.shape_records(16, "paired", seed=5)[i] for i in range(16)]
  train = fx.shape_records(32, "paired")
  monkeypatch.setattr(llm_similarity, "held_out_records", lambda spec, limit: records)
  real = llm_similarity.llm_similarity
  monkeypatch.setattr(llm_similarity, "llm_similarity",
                      lambda *a, **k: real(*a, **{**k, "train_source": train}))
  out = tmp_path / "out" / "mordal_llm_similarity.json"
  FLAGS.unparse_flags()
  FLAGS(["select", "--method=mordal_llm_similarity", f"--vision_models={models['vit']}",
         f"--llm_models={models['llama']},{models['gemma3']}", "--data=unused",
         "--max_steps=4", "--batch_size=8", "--max_len=32",
         "--vision_layer=-2", "--learning_rate=1e-2", "--eval_batch_size=8",
         f"--output_dir={out.parent}"])
  try:
    payload = select.run_method()
  finally:
    FLAGS.unparse_flags()
  entry = payload["vision"][models["vit"]]
  csv_path = str(out.parent / ("mordal_llm_similarity" + entry["csv_suffix"]))
  names, matrix = tables.read_similarity(csv_path)
  assert names == [models["llama"], models["gemma3"]]
  np.testing.assert_allclose(matrix, np.asarray(entry["cka"]), atol=1e-6)
  assert json.loads(out.read_text())["images"] == 16
  assert all(v is not None for v in entry["warmup_loss"].values())
  assert entry["vision_layer"] == -2  # --vision_layer, since the tower's name gives none
  # A line per (medoid, LLM) as its warm-up and representations are done, over the 1 × 2.
  printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
  assert len(printed) == 2
  assert re.fullmatch(r"\[1/2\] vit\+llama\twarm-up 4 steps\tloss \d+\.\d{4}\t16 images\t"
                      r"\(\d[^;]*; [^;]* so far; about [^;]* left\)", printed[0]), printed
  assert re.fullmatch(r"\[2/2\] vit\+gemma3\twarm-up 4 steps\tloss \d+\.\d{4}\t16 images\t"
                      r"\(\d[^;]*; [^;]* so far\)", printed[1]), printed
