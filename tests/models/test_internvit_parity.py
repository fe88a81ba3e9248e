"""Parity of the NNX InternViT with transformers' torch ``InternVLVisionModel``.

Each case builds a tiny torch tower with every parameter randomised, saves it with
``save_pretrained`` (a bare ``InternVLVisionModel``, or a whole ``InternVLForConditionalGeneration``
whose ``vision_tower.`` keys are the tower), loads the directory through ``load_pretrained`` and
``zoo.load`` and compares every hidden state and ``last_hidden_state`` on the same images.

Tolerance: float32, max abs error <= 1e-4 * max(1, max |reference|), i.e. 1e-4 relative to the
tensor's scale (``REL_TOL``).
"""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from encoder_parity_util import assert_tower_in_vlm, load_hub_snapshot
import parity_util

from vlmsel_jax import zoo
from vlmsel_jax.features import patch_grid as patch_grid_lib
from vlmsel_jax.models import HFDirectory, load_pretrained
from vlmsel_jax.models.internvit import InternVit, InternVitConfig, reads_key

REL_TOL = 1e-4
BATCH = 2
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
CASES = {
    # InternVL2.5 / 3 towers: LayerNorm, no q/k norm, mean pooling (no final norm).
    "layer_norm": dict(VISION),
    # InternViT-6B style: RMSNorm, q/k RMSNorm, q/k/v biases, and a final LayerNorm.
    "rms_qk_norm": dict(VISION, norm_type="rms_norm", use_qk_norm=True, attention_bias=True,
                        use_mean_pooling=False),
}
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, model_type="qwen2")


def _tol(ref: np.ndarray) -> float:
  return REL_TOL * max(1.0, float(np.abs(ref).max()))


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Every parameter random: norm scales and layer scales 1 + noise, everything else noise, so a
  swapped norm, a missing bias or an unused tensor changes the output."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = "lambda" in name or (name.endswith("weight") and "norm" in name)
      p.copy_(torch.randn_like(p) * (0.2 if is_scale else 0.1) + (1.0 if is_scale else 0.0))
  return model.eval()


def _pixels(height=32, width=32, seed=1):
  return np.random.RandomState(seed).randn(BATCH, 3, height, width).astype(np.float32)


def _torch_outputs(model, x):
  with torch.no_grad():
    out = model(pixel_values=torch.tensor(x), output_hidden_states=True)
  return {"hidden_states": [h.numpy() for h in out.hidden_states],
          "last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": None}


_forward = nnx.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(case) -> (directory, torch tower): saved once per module, never modified.

  Case "full" is a whole InternVLForConditionalGeneration (tower of "layer_norm" shape); its
  torch tower is ``model.model.vision_tower``.
  """

  @functools.cache
  def make(case):
    path = tmp_path_factory.mktemp(case)
    if case == "full":
      config = transformers.InternVLConfig(vision_config=CASES["layer_norm"], text_config=TEXT)
      model = _randomise(transformers.InternVLForConditionalGeneration(config))
      model.save_pretrained(path)
      return path, model.model.vision_tower
    model = _randomise(transformers.InternVLVisionModel(
        transformers.InternVLVisionConfig(**CASES[case])))
    model.save_pretrained(path)
    # InternVL's processor settings (GotOcr2ImageProcessor): a bicubic resize, ImageNet stats.
    with open(path / "preprocessor_config.json", "w", encoding="utf-8") as f:
      json.dump({"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 32,
                 "width": 32}, "resample": 3, "crop_to_patches": False,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, f)
    return path, model

  return make


@pytest.mark.parametrize("case", ["layer_norm", "rms_qk_norm", "full"])
def test_hidden_states_match_transformers(checkpoint, case):
  path, torch_model = checkpoint(case)
  model = load_pretrained(path)
  assert isinstance(model, InternVit)
  x = _pixels()
  parity_util.assert_outputs_match(_forward(model, x.transpose(0, 2, 3, 1)),
                                   _torch_outputs(torch_model, x), tol_of=_tol)


def test_other_image_size_resizes_positions_like_transformers(checkpoint):
  """A 40 x 24 image: the 4 x 4 position table is resized (bicubic) to 5 x 3 as transformers
  does."""
  path, torch_model = checkpoint("rms_qk_norm")
  x = _pixels(40, 24)
  out = _forward(load_pretrained(path), x.transpose(0, 2, 3, 1))
  assert out.grid == (5, 3)
  parity_util.assert_outputs_match(out, _torch_outputs(torch_model, x), tol_of=_tol)


def test_config_reads_vision_config_of_the_full_model(checkpoint):
  path, _ = checkpoint("full")
  config = InternVitConfig.from_hf(path)
  assert (config.hidden_size, config.num_layers, config.model_type) == (32, 2, "internvl")
  with pytest.raises(ValueError, match="not an InternViT"):
    InternVitConfig.from_hf({"model_type": "clip_vision_model"})


def test_only_the_tower_of_a_whole_internvl_checkpoint_is_read(checkpoint):
  """What a whole InternVL checkpoint holds besides the tower is never read (nor fetched from
  the Hub: ``hub`` asks for the shards holding a key ``reads_key`` accepts)."""
  path, _ = checkpoint("full")
  source = HFDirectory(path)
  keys = [k for k, _ in source]
  reads = reads_key(InternVitConfig.from_hf(source.config))
  read = [k for k, _ in source.select(reads)]
  assert read == [k for k in keys if "vision_tower." in k]
  assert any(k.startswith(("language_model.", "model.language_model.")) for k in keys)
  assert any("multi_modal_projector." in k for k in keys)
  tower_only = reads_key(InternVitConfig.from_hf({"model_type": "internvl_vision",
                                                  **CASES["layer_norm"]}))
  assert tower_only("language_model.anything")  # A tower checkpoint's keys are all its own.


def test_zoo_load_features_patch_grid_and_variants(checkpoint):
  path, torch_model = checkpoint("rms_qk_norm")
  assert zoo.resolve(str(path)).kind == "vision"
  loaded = zoo.load(str(path))
  assert loaded.poolings == ("cls", "mean")  # transformers' tower has no pooler_output
  prep = loaded.preprocessing
  assert prep.image_size == (32, 32) and prep.mean == (0.485, 0.456, 0.406)
  x = _pixels()
  ref = _torch_outputs(torch_model, x)["hidden_states"]
  pixels = jnp.asarray(x.transpose(0, 2, 3, 1))

  features = nnx.jit(loaded.features, static_argnums=(2, 3))
  cls = features(loaded.model, {"pixels": pixels}, -1, "cls")
  np.testing.assert_allclose(np.asarray(cls), ref[-1][:, 0], atol=_tol(ref[-1]), rtol=0)
  # The C score's grid: the second-to-last layer's patch tokens, row-major, CLS dropped.
  grid = patch_grid_lib.patch_grid_fn(loaded)(pixels)
  assert grid.shape == (BATCH, 4, 4, 32)
  np.testing.assert_allclose(np.asarray(grid), ref[-2][:, 1:].reshape(BATCH, 4, 4, 32),
                             atol=_tol(ref[-2]), rtol=0)

  assert zoo.load(f"{path}@layer=-3").default_layer == -3
  # res=: the processor's resize at 40 px; the tower resizes its positions as transformers does
  # (numerics: test_other_image_size_resizes_positions_like_transformers).
  at_40 = zoo.load(f"{path}@res=40")
  assert at_40.preprocessing.image_size == (40, 40)
  assert patch_grid_lib.patch_grid_fn(at_40)(jnp.zeros((1, 40, 40, 3))).shape == (1, 5, 5, 32)


def test_hub_id_resolves_and_loads(checkpoint, tmp_path, monkeypatch):
  path, _ = checkpoint("full")
  loaded = load_hub_snapshot(path, "vlmsel-test/internvl-tiny", -2, tmp_path, monkeypatch)
  assert isinstance(loaded.model, InternVit) and loaded.default_layer == -2


def test_tower_in_a_vlm_with_fused_attention_and_remat(checkpoint):
  """The VLM reads the tower through ``patch_grid``, with the fused attention path and remat set
  on the tower by the VLM; its image tokens are transformers' second-to-last patch tokens."""
  path, torch_model = checkpoint("rms_qk_norm")
  x = _pixels()
  assert_tower_in_vlm(load_pretrained(path), (32, 32), x,
                      _torch_outputs(torch_model, x)["hidden_states"][-2][:, 1:], _tol)
