"""Shared pieces of the encoder parity tests (BERT, ViT, EVA-02, InternViT): tiny checkpoints
saved once per module, a checkpoint saved without its pooler, a vision tower found as a Hub id,
and a vision tower inside a VLM."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from huggingface_hub import constants as hf_constants

import hub_fixtures
from vlmsel_jax import zoo
from vlmsel_jax.models import CheckpointError, HFDirectory, load_model, load_pretrained
from vlmsel_jax.models.llama import modeling as llama
from vlmsel_jax.models.vlm import modeling as vlm


def saved_checkpoints(tmp_path_factory, build):
  """checkpoint(case) -> (directory, torch model ``build(case)``), saved with
  ``save_pretrained`` once per case into a fresh temporary directory, never modified."""

  @functools.cache
  def make(case):
    path = tmp_path_factory.mktemp(case)
    model = build(case)
    model.save_pretrained(path)
    return path, model

  return make


def load_without_pooler(path, torch_model):
  """Saves ``torch_model`` (built with ``add_pooling_layer=False``, width 32) to ``path``; returns
  our model of it, loaded with ``add_pooling_layer: false`` in the config dict."""
  torch_model.save_pretrained(path)
  # config.json cannot tell a pooler-less model apart, so the pooler is expected by default...
  with pytest.raises(CheckpointError, match=r"missing parameter pooler\.kernel \(32, 32\)"):
    load_pretrained(path)
  # ...and add_pooling_layer: false in the config dict says there is none.
  source = HFDirectory(path)
  model = load_model({**source.config, "add_pooling_layer": False}, source)
  assert model.pooler is None
  return model


def load_hub_snapshot(path, hub_id, layer, tmp_path, monkeypatch):
  """Stores the checkpoint directory ``path`` as the offline Hub snapshot of ``hub_id``; returns
  what ``zoo.resolve(f"{hub_id}@layer={layer}")`` loads, after checking it resolved to a Hub
  vision tower."""
  hub_fixtures.add_snapshot(tmp_path / "hub", hub_id, path)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  resolved = zoo.resolve(f"{hub_id}@layer={layer}")
  assert resolved.kind == "vision" and resolved.hub is not None
  return resolved.load()


def assert_tower_in_vlm(tower, image_size, x, ref_patch_tokens, tol):
  """Puts ``tower`` (a 4 x 4 patch grid of width 32 at ``image_size``) in a VLM with a tiny
  Llama, the fused attention path and remat; checks the VLM sets both on the tower, that its
  image features are ``ref_patch_tokens`` (the reference's second-to-last patch tokens of the
  NCHW images ``x``, within ``tol(ref_patch_tokens)``) and that its logits are finite."""
  llm = llama.Llama(llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8),
                    rngs=nnx.Rngs(3))
  model = vlm.VLM(tower, llm, vlm.VLMConfig(attention_impl="fused", remat=True),
                  image_size=image_size, rngs=nnx.Rngs(1))
  assert model.num_image_tokens == 16 and model.vision_dim == 32
  assert model.tower.config.attention_impl == "fused" and model.tower.config.remat is True
  batch = x.shape[0]
  pixels = jnp.asarray(x.transpose(0, 2, 3, 1))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (batch, 20)))
  mask = jnp.ones((batch, 20), jnp.int32)
  image_mask = jnp.zeros((batch, 20), bool).at[:, 2:18].set(True)  # a 4 x 4 grid: 16 tokens

  @nnx.jit
  def run(model):
    return (vlm.image_features(model.tower, pixels, model.config),
            model(pixels, ids, mask, image_mask))

  feats, logits = run(model)
  np.testing.assert_allclose(np.asarray(feats), ref_patch_tokens, atol=tol(ref_patch_tokens),
                             rtol=0)
  assert logits.shape == (batch, 20, 40) and bool(jnp.isfinite(logits).all())
