"""Parity of the NNX EVA-02 towers with timm's torch ``eva02_*`` models.

Each case builds a tiny timm model (the architecture's definition with a small width and depth
through ``create_model`` kwargs) with every parameter randomised, writes it with timm's own
``save_for_hf`` (``config.json`` with ``architecture`` / ``model_args`` / ``pretrained_cfg`` and
``model.safetensors`` of ``model.state_dict()``, a timm Hub repo's layout), loads the directory
through ``loading.load_timm_pretrained`` and ``zoo.load`` and compares the embeddings, every
block's output (``forward_intermediates``), ``forward_features`` and the pre-logits.

Tolerance: float32, max abs error <= 1e-4 * max(1, max |reference|), i.e. 1e-4 relative to the
tensor's scale (``REL_TOL``).
"""

from __future__ import annotations

import copy
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from encoder_parity_util import assert_tower_in_vlm, load_hub_snapshot
import parity_util
import references

from vlmsel_jax import zoo
from vlmsel_jax.features import patch_grid as patch_grid_lib
from vlmsel_jax.models import CheckpointError, UnsupportedModelError, loading
from vlmsel_jax.models.eva02 import Eva02, Eva02Config, rope_table
from vlmsel_jax.zoo.preprocessing import TimmPreprocessing

timm = references.import_reference("timm")
from timm.models._hub import save_for_hf  # pylint: disable=wrong-import-position

REL_TOL = 1e-4
BATCH = 2
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=56)  # 4 x 4 patches of 14, heads of 16
# name -> (timm architecture, create_model kwargs)
CASES = {
    # Fused qkv with q/v biases, packed SwiGLU, avg pooling + fc_norm.
    "tiny": ("eva02_tiny_patch14_224", TINY),
    # Separate q/k/v projections, SwiGLU with sub-LN.
    "base": ("eva02_base_patch14_224", TINY),
    # CLS pooling (a final norm instead of fc_norm), a 336 px definition at 56 x 42 px: on a
    # rectangular 4 x 3 grid rope rows and columns must not be swapped. (Large is base's code
    # path at another shape: test_config_from_architecture_table_and_refusals.)
    "small_token_pool_rectangular": ("eva02_small_patch14_336",
                                     dict(TINY, global_pool="token", img_size=(56, 42))),
}


def _tol(ref: np.ndarray) -> float:
  return REL_TOL * max(1.0, float(np.abs(ref).max()))


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Every parameter random: norm scales 1 + noise, everything else noise (biases included)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = name.endswith("weight") and "norm" in name
      p.copy_(torch.randn_like(p) * (0.2 if is_scale else 0.1) + (1.0 if is_scale else 0.0))
  return model.eval()


def _pixels(height, width, seed=1):
  return np.random.RandomState(seed).randn(BATCH, 3, height, width).astype(np.float32)


def _timm_outputs(model, x):
  """timm's embeddings, block outputs (prefix token first), forward_features and pre-logits."""
  with torch.no_grad():
    t = torch.tensor(x)
    embeddings = model._pos_embed(model.patch_embed(t))[0]  # pylint: disable=protected-access
    _, blocks = model.forward_intermediates(t, output_fmt="NLC", return_prefix_tokens=True)
    features = model.forward_features(t)
    pre_logits = model.forward_head(features, pre_logits=True)
  hidden = [embeddings.numpy()] + [torch.cat([prefix, patches], 1).numpy()
                                   for patches, prefix in blocks]
  return {"hidden_states": hidden, "last_hidden_state": features.numpy(),
          "pooler_output": pre_logits.numpy()}


_forward = nnx.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(case) -> (directory, timm model): written once per module, never modified."""

  @functools.cache
  def make(case):
    arch, kwargs = CASES[case]
    model = _randomise(timm.create_model(arch, pretrained=False, num_classes=5, **kwargs))
    path = tmp_path_factory.mktemp(case)
    save_for_hf(model, path, safe_serialization=True)
    return path, model

  return make


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_hidden_state_matches_timm(checkpoint, case):
  path, timm_model = checkpoint(case)
  model = loading.load_timm_pretrained(path)
  assert isinstance(model, Eva02)
  height, width = timm_model.patch_embed.img_size
  x = _pixels(height, width)
  out = _forward(model, x.transpose(0, 2, 3, 1))
  assert out.grid == timm_model.patch_embed.grid_size
  parity_util.assert_outputs_match(out, _timm_outputs(timm_model, x), tol_of=_tol)


def test_rope_table_is_timms_rotary_embedding_cat(checkpoint):
  path, timm_model = checkpoint("small_token_pool_rectangular")
  config = Eva02Config.from_timm(json.loads((path / "config.json").read_text()))
  assert config.grid == (4, 3)
  sin, cos = timm_model.rope.get_embed().chunk(2, -1)
  ours_sin, ours_cos = rope_table(config)
  np.testing.assert_allclose(ours_sin, sin.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(ours_cos, cos.numpy(), atol=1e-6, rtol=0)


def test_config_from_architecture_table_and_refusals():
  large = Eva02Config.from_timm({"architecture": "eva02_large_patch14_448"})
  assert (large.hidden_size, large.num_layers, large.num_heads, large.intermediate_size,
          large.image_size, large.qkv_fused, large.sub_ln) == (
              1024, 24, 16, 2730, (448, 448), False, True)
  tiny = Eva02Config.from_timm({"architecture": "eva02_tiny_patch14_224.mim_in22k"})
  assert (tiny.hidden_size, tiny.intermediate_size, tiny.qkv_fused, tiny.sub_ln) == (
      192, 512, True, False)
  with pytest.raises(ValueError, match="eva02_base_patch16_clip_224.*not supported"):
    Eva02Config.from_timm({"architecture": "eva02_base_patch16_clip_224"})
  with pytest.raises(ValueError, match="model_args qk_norm=True is not supported"):
    Eva02Config.from_timm({"architecture": "eva02_tiny_patch14_224",
                           "model_args": {"qk_norm": True}})
  with pytest.raises(ValueError, match="model_args 'use_naflex' is not supported"):
    Eva02Config.from_timm({"architecture": "eva02_tiny_patch14_224",
                           "model_args": {"use_naflex": True}})


def test_unknown_timm_architecture_and_bad_tensors_are_refused(checkpoint, tmp_path):
  path, _ = checkpoint("tiny")
  config = json.loads((path / "config.json").read_text())
  other = tmp_path / "resnet"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({**config, "architecture": "resnet50"}))
  (other / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
  with pytest.raises(zoo.ZooError, match="timm architecture 'resnet50' is not supported"):
    zoo.resolve(str(other))
  with pytest.raises(UnsupportedModelError, match="'resnet50' is not supported"):
    loading.load_timm_pretrained(other)
  # The tiny weights under a base config: the fused qkv / packed MLP keys have no parameter.
  mismatched = tmp_path / "mismatched"
  mismatched.mkdir()
  (mismatched / "config.json").write_text(json.dumps(
      {**config, "architecture": "eva02_base_patch14_224"}))
  (mismatched / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
  with pytest.raises(CheckpointError, match="attn.qkv.weight"):
    loading.load_timm_pretrained(mismatched)


def test_zoo_load_features_patch_grid_and_variants(checkpoint):
  path, timm_model = checkpoint("base")
  assert zoo.resolve(str(path)).kind == "vision"
  loaded = zoo.load(str(path))
  assert loaded.poolings == ("cls", "mean", "pooler")
  assert loaded.preprocessing == TimmPreprocessing(
      size=56, crop_pct=0.9, interpolation="bicubic", mean=(0.48145466, 0.4578275, 0.40821073),
      std=(0.26862954, 0.26130258, 0.27577711))
  x = _pixels(56, 56)
  ref = _timm_outputs(timm_model, x)
  pixels = jnp.asarray(x.transpose(0, 2, 3, 1))
  features = nnx.jit(loaded.features, static_argnums=(2, 3))
  pooled = features(loaded.model, {"pixels": pixels}, -1, "pooler")
  np.testing.assert_allclose(np.asarray(pooled), ref["pooler_output"],
                             atol=_tol(ref["pooler_output"]), rtol=0)
  # The C score's grid: the second-to-last block's patch tokens, row-major, CLS dropped.
  grid = patch_grid_lib.patch_grid_fn(loaded)(pixels)
  assert grid.shape == (BATCH, 4, 4, 32)
  expected = ref["hidden_states"][-2][:, 1:].reshape(BATCH, 4, 4, 32)
  np.testing.assert_allclose(np.asarray(grid), expected, atol=_tol(expected), rtol=0)

  assert zoo.load(f"{path}@layer=-2").default_layer == -2
  with pytest.raises(zoo.ZooError, match=r"image_size \(8, 8\) is smaller than patch_size"):
    zoo.load(f"{path}@res=8")


def test_res_variant_is_timm_at_another_img_size(checkpoint):
  """``@res=70``: timm's ``set_input_size(70)`` (what ``create_model(img_size=70)`` loads a
  checkpoint as): positions resampled (antialiased bicubic) to 5 x 5, the rope on a 5 x 5 grid
  still scaled to the 16 x 16 reference, and timm's eval recipe at 70 px."""
  path, timm_model = checkpoint("base")
  loaded = zoo.load(f"{path}@layer=-2,res=70")
  assert loaded.preprocessing.image_size == (70, 70) and loaded.default_layer == -2
  assert loaded.model.config.image_size == (70, 70)
  reference = copy.deepcopy(timm_model)
  reference.set_input_size(img_size=(70, 70))
  x = _pixels(70, 70)
  out = _forward(loaded.model, x.transpose(0, 2, 3, 1))
  assert out.grid == (5, 5)
  parity_util.assert_outputs_match(out, _timm_outputs(reference, x), tol_of=_tol)
  # The model at the native size is untouched (the weights are shared, the table is not).
  assert zoo.load(str(path)).model.pos_embed.shape == (1, 17, 32)


def test_timm_eval_preprocessing():
  """Shorter side to floor(size / crop_pct), torchvision's round() centre crop, /255, mean/std."""
  prep = TimmPreprocessing(size=28, crop_pct=0.9, interpolation="bicubic", mean=(0.5, 0.4, 0.3),
                           std=(0.2, 0.25, 0.3))
  assert prep.scale_size == 31
  # (31 - 28) / 2 = 1.5 rounds to 2 (a floor would give 1); (46 - 28) / 2 = 9.
  assert prep.crop_box(31, 46) == (2, 9)
  image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (200, 300, 3), np.uint8))
  resized = np.asarray(image.resize((46, 31), Image.Resampling.BICUBIC), np.float32)
  expected = (resized[2:30, 9:37] / np.float32(255.0) - np.float32([0.5, 0.4, 0.3])) / \
      np.float32([0.2, 0.25, 0.3])
  np.testing.assert_array_equal(prep(image), expected)
  # Already at the scale size: no resize, only the crop.
  small = Image.fromarray(np.asarray(image)[:31, :40])
  np.testing.assert_array_equal(
      prep(small), (np.asarray(small, np.float32)[2:30, 6:34] / np.float32(255.0)
                    - np.float32([0.5, 0.4, 0.3])) / np.float32([0.2, 0.25, 0.3]))


def test_hub_id_resolves_and_loads(checkpoint, tmp_path, monkeypatch):
  path, _ = checkpoint("tiny")
  loaded = load_hub_snapshot(path, "vlmsel-test/eva02-tiny", -3, tmp_path, monkeypatch)
  assert isinstance(loaded.model, Eva02) and loaded.default_layer == -3


def test_tower_in_a_vlm_with_fused_attention_and_remat(checkpoint):
  """The VLM reads the tower through ``patch_grid``, with the fused attention path and remat set
  on the tower by the VLM; its image tokens are timm's second-to-last patch tokens."""
  path, timm_model = checkpoint("tiny")
  x = _pixels(56, 56)
  assert_tower_in_vlm(loading.load_timm_pretrained(path), (56, 56), x,
                      _timm_outputs(timm_model, x)["hidden_states"][-2][:, 1:], _tol)
