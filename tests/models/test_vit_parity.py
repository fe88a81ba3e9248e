"""Parity of the NNX vision transformers with transformers' torch CLIP / SigLIP / DINOv2 / ViT.

Each case builds a tiny torch model with every parameter randomised, saves it with
``save_pretrained``, loads the directory with ``vlmsel_jax.models.load_pretrained`` and compares
every hidden state, ``last_hidden_state`` and ``pooler_output`` on the same images. Torch takes
NCHW images, ours NHWC: the tests transpose.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from encoder_parity_util import load_without_pooler, saved_checkpoints
import parity_util

from vlmsel_jax.models import (
    CheckpointError,
    HFDirectory,
    UnsupportedModelError,
    load_model,
    load_pretrained,
)
from vlmsel_jax.models.vit import (
    Vit,
    VitConfig,
    bicubic_resize_weights,
    resize_grid,
    select_features,
)

F32_ATOL = 1e-4
BF16_RTOL_OF_MAX = 2e-2
BATCH = 2

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, mlp_ratio=2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=64)

# name -> (builds the torch model, tokens before the patch tokens, has pooler_output)
CASES = {
    "clip": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
             1, True),
    "clip_gelu": (lambda: transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(**VISION, hidden_act="gelu")), 1, True),
    "siglip": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
               0, True),
    "siglip_no_head": (lambda: transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**VISION, vision_use_head=False)), 0, False),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINO)), 1, True),
    "dinov2_swiglu_no_qkv_bias": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        **DINO, use_swiglu_ffn=True, qkv_bias=False)), 1, True),
    "dinov2_registers": (lambda: transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**DINO, num_register_tokens=3)), 4, True),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**VISION)), 1, True),
    "vit_rectangular": (lambda: transformers.ViTModel(transformers.ViTConfig(
        **{**VISION, "image_size": [32, 24]})), 1, True),
}


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Gives every parameter a random value, so a mis-routed or unused tensor changes the output.

  Default init sets norm scales and layer scales to one and biases to zero, which would hide a
  swapped norm or a missing bias; here scales are 1 + noise and everything else noise.
  """
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = name.endswith("lambda1") or (
          name.endswith("weight") and ("norm" in name or "layrnorm" in name))
      p.copy_(torch.randn_like(p) * (0.2 if is_scale else 0.1) + (1.0 if is_scale else 0.0))
  return model.eval()


def _pixels(height=32, width=32, seed=1):
  """A random NCHW float32 batch, the layout torch takes."""
  return np.random.RandomState(seed).randn(BATCH, 3, height, width).astype(np.float32)


def _nhwc(x):
  return x.transpose(0, 2, 3, 1)


def _torch_outputs(model, x, **kwargs):
  with torch.no_grad():
    out = model(pixel_values=torch.tensor(x), output_hidden_states=True, **kwargs)
  return {
      "hidden_states": [h.numpy() for h in out.hidden_states],
      "last_hidden_state": out.last_hidden_state.numpy(),
      "pooler_output": None if out.pooler_output is None else out.pooler_output.numpy(),
  }


_forward = nnx.jit(lambda model, x: model(x))
_select = jax.jit(select_features, static_argnames=("layer", "pooling"))


_assert_matches = parity_util.assert_outputs_match


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(case) -> (directory, torch model): saved once per module, never modified."""
  return saved_checkpoints(tmp_path_factory, lambda case: _randomise(CASES[case][0]()))


@pytest.mark.parametrize("case", list(CASES))
def test_vit_parity_hidden_states_last_and_pooler(checkpoint, case):
  path, torch_model = checkpoint(case)
  model = load_pretrained(path)
  x = _pixels(*model.config.image_size)
  out = _forward(model, _nhwc(x))
  assert len(out.hidden_states) == VISION["num_hidden_layers"] + 1
  assert (out.pooler_output is not None) == CASES[case][2]
  _assert_matches(out, _torch_outputs(torch_model, x))


@pytest.mark.parametrize("case", ["dinov2", "dinov2_registers"])
@pytest.mark.parametrize("size", [(48, 40), (16, 16)], ids=["up_nonsquare", "down"])
def test_vit_parity_dinov2_resized_position_embeddings(checkpoint, case, size):
  """Off the native 32x32, DINOv2 resizes its 4x4 position grid (registers: antialiased)."""
  path, torch_model = checkpoint(case)
  x = _pixels(*size)
  out = _forward(load_pretrained(path), _nhwc(x))
  assert out.grid == (size[0] // 8, size[1] // 8)
  _assert_matches(out, _torch_outputs(torch_model, x))


@pytest.mark.parametrize("antialias", [False, True])
def test_vit_parity_bicubic_resize_matches_torch_interpolate(antialias):
  grid = np.random.RandomState(0).randn(5, 7, 3).astype(np.float32)
  for size in [(5, 7), (9, 4), (2, 13), (3, 3), (16, 11)]:
    ref = torch.nn.functional.interpolate(
        torch.tensor(grid.transpose(2, 0, 1)[None]), size=size, mode="bicubic",
        align_corners=False, antialias=antialias)[0].numpy().transpose(1, 2, 0)
    ours = np.asarray(resize_grid(jnp.asarray(grid), size, antialias=antialias))
    np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f"size {size}")
  # The two modes give different weights even when upsampling, so the loop checks two things.
  assert not np.allclose(bicubic_resize_weights(4, 6, antialias=False),
                         bicubic_resize_weights(4, 6, antialias=True))


@pytest.mark.parametrize("case", ["clip", "siglip", "dinov2_registers", "vit_rectangular"])
def test_vit_parity_select_features(checkpoint, case):
  """select_features equals slicing transformers' outputs by hand, CLS and registers dropped."""
  path, torch_model = checkpoint(case)
  model = load_pretrained(path)
  x = _pixels(*model.config.image_size)
  out = _forward(model, _nhwc(x))
  ref = _torch_outputs(torch_model, x)
  prefix = CASES[case][1]
  rows, cols = x.shape[2] // 8, x.shape[3] // 8
  for layer in (-1, -2, 0, None):
    h = ref["last_hidden_state"] if layer is None else ref["hidden_states"][layer]
    expected = {
        "mean": h[:, prefix:].mean(axis=1),
        "patch_grid": h[:, prefix:].reshape(BATCH, rows, cols, -1),
    }
    if prefix:
      expected["cls"] = h[:, 0]
    for pooling, want in expected.items():
      got = np.asarray(_select(out, layer=layer, pooling=pooling))
      assert got.shape == want.shape, (layer, pooling)
      np.testing.assert_allclose(got, want, atol=F32_ATOL, err_msg=f"{layer} {pooling}")
  got = np.asarray(_select(out, pooling="pooler"))
  np.testing.assert_allclose(got, ref["pooler_output"], atol=F32_ATOL)


def test_vit_select_features_rejects_what_the_model_lacks(checkpoint):
  siglip = _forward(load_pretrained(checkpoint("siglip_no_head")[0]), _nhwc(_pixels()))
  with pytest.raises(ValueError, match=r"no CLS token"):
    select_features(siglip, pooling="cls")
  with pytest.raises(ValueError, match=r"no pooler_output"):
    select_features(siglip, pooling="pooler")
  with pytest.raises(ValueError, match=r"pooling 'max' is not one of"):
    select_features(siglip, pooling="max")
  clip = _forward(load_pretrained(checkpoint("clip")[0]), _nhwc(_pixels()))
  with pytest.raises(ValueError, match=r"leave layer at its default"):
    select_features(clip, layer=-2, pooling="pooler")


def _contrastive(kind):
  """A tiny random full CLIPModel / SiglipModel."""
  if kind == "clip":
    config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
    return _randomise(transformers.CLIPModel(config))
  config = transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)
  return _randomise(transformers.SiglipModel(config))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vit_parity_full_contrastive_checkpoint(tmp_path, kind):
  """A full CLIPModel / SiglipModel directory loads as its vision tower, text weights skipped."""
  torch_model = _contrastive(kind)
  torch_model.save_pretrained(tmp_path)
  keys = [k for k, _ in HFDirectory(tmp_path)]
  assert any(k.startswith("text_model.") for k in keys)
  assert "logit_scale" in keys
  model = load_pretrained(tmp_path)
  assert model.config.contrastive and model.config.variant == kind
  x = _pixels()
  _assert_matches(_forward(model, _nhwc(x)), _torch_outputs(torch_model.vision_model, x))


def test_vit_loading_contrastive_skips_only_known_keys(tmp_path):
  """Text weights are skipped by name: stray keys anywhere still fail the load."""
  _contrastive("clip").save_pretrained(tmp_path)
  source = HFDirectory(tmp_path)
  pairs = list(source)
  stray = [("vision_model.embeddings.extra_token", np.zeros(32, np.float32)),
           ("image_projection.weight", np.zeros((16, 32), np.float32))]
  with pytest.raises(CheckpointError, match=r"2 problem\(s\)") as info:
    load_model(source.config, pairs + stray)
  message = str(info.value)
  assert "unexpected key 'vision_model.embeddings.extra_token'" in message
  assert "unexpected key 'image_projection.weight'" in message


def test_vit_loading_vision_only_config_rejects_text_weights(checkpoint):
  """Without a full CLIPModel config, a text tower key is an error, not silently skipped."""
  source = HFDirectory(checkpoint("clip")[0])
  text = ("text_model.embeddings.token_embedding.weight", np.zeros((64, 32), np.float32))
  with pytest.raises(CheckpointError, match=r"unexpected key 'text_model\.embeddings\."):
    load_model(source.config, list(source) + [text])


def test_vit_parity_clip_vision_hub_prefix(checkpoint):
  """Hub CLIPVisionModel checkpoints keep the ``vision_model.`` prefix that transformers 5 drops."""
  path, torch_model = checkpoint("clip")
  source = HFDirectory(path)
  prefixed = [("vision_model." + k, v) for k, v in source]
  x = _pixels()
  out = _forward(load_model(source.config, prefixed), _nhwc(x))
  _assert_matches(out, _torch_outputs(torch_model, x))


def test_vit_parity_vit_without_pooler(tmp_path):
  torch_model = _randomise(transformers.ViTModel(transformers.ViTConfig(**VISION),
                                                 add_pooling_layer=False))
  model = load_without_pooler(tmp_path, torch_model)
  x = _pixels()
  _assert_matches(_forward(model, _nhwc(x)), _torch_outputs(torch_model, x))


def test_vit_parity_bfloat16(checkpoint):
  path, torch_model = checkpoint("dinov2_registers")
  model = load_pretrained(path, dtype="bfloat16")
  x = _pixels(48, 40)
  out = _forward(model, _nhwc(x))
  assert out.last_hidden_state.dtype == jnp.bfloat16
  _assert_matches(out, _torch_outputs(torch_model, x),
                  tol_of=lambda ref: BF16_RTOL_OF_MAX * float(np.abs(ref).max()))


def test_vit_parity_jax_jit_of_split_state(checkpoint):
  """The model and select_features run as one pure function of the state under ``jax.jit``."""
  path, torch_model = checkpoint("siglip")
  graphdef, state = nnx.split(load_pretrained(path))

  @jax.jit
  def features(state, x):
    return select_features(nnx.merge(graphdef, state)(x), layer=-2, pooling="patch_grid")

  x = _pixels()
  ref = _torch_outputs(torch_model, x)["hidden_states"][-2].reshape(BATCH, 4, 4, 32)
  np.testing.assert_allclose(np.asarray(features(state, _nhwc(x))), ref, atol=F32_ATOL)


def test_vit_rejects_wrong_layout_and_size(checkpoint):
  model = load_pretrained(checkpoint("clip")[0])
  with pytest.raises(ValueError, match=r"pixel_values must be NHWC \(batch, height, width, 3\); "
                     r"got shape \(2, 3, 32, 32\)"):
    model(jnp.asarray(_pixels()))
  with pytest.raises(ValueError, match=r"input image size \(48\*48\) does not match the "
                     r"model's \(32\*32\)"):
    model(jnp.asarray(_nhwc(_pixels(48, 48))))


def test_vit_config_from_hf_reads_saved_and_sparse_configs(checkpoint, tmp_path):
  c = VitConfig.from_hf(checkpoint("dinov2_registers")[0])
  assert (c.variant, c.model_type, c.num_register_tokens, c.num_prefix_tokens) == (
      "dinov2", "dinov2_with_registers", 3, 4)
  assert (c.intermediate_size, c.antialias_positions, c.grid) == (64, True, (4, 4))
  c = VitConfig.from_hf(checkpoint("vit_rectangular")[0] / "config.json")
  assert (c.image_size, c.grid, c.layer_norm_eps, c.pooler) == ((32, 24), (4, 3), 1e-12, True)
  # Hub configs of the full models often give little more than the vision model_type.
  c = VitConfig.from_hf({"model_type": "siglip", "architectures": ["SiglipModel"],
                         "vision_config": {"patch_size": 16}})
  assert (c.variant, c.contrastive, c.hidden_size, c.num_layers, c.image_size) == (
      "siglip", True, 768, 12, (224, 224))
  assert (c.hidden_act, c.layer_norm_eps, c.pooler, c.has_class_token) == (
      "gelu_pytorch_tanh", 1e-6, True, False)
  c = VitConfig.from_hf({"model_type": "clip", "vision_config": {
      "hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14}})
  assert (c.variant, c.hidden_act, c.grid, c.num_positions) == ("clip", "quick_gelu", (16, 16),
                                                                257)
  # DINOv2-giant: SwiGLU keeps two thirds of mlp_ratio * hidden, rounded up to a multiple of 8.
  c = VitConfig.from_hf({"model_type": "dinov2", "hidden_size": 1536, "use_swiglu_ffn": True})
  assert (c.swiglu, c.intermediate_size, c.patch_size) == (True, 4096, (14, 14))


@pytest.mark.parametrize("config, match", [
    ({"model_type": "vit", "hidden_act": "relu"}, r"hidden_act 'relu' is not supported"),
    ({"model_type": "vit", "pooler_act": "relu"}, r"pooler_act 'relu' is not supported"),
    ({"model_type": "beit"}, r"model_type 'beit' is not a vision transformer supported here"),
    ({"model_type": "clip", "vision_config": {"model_type": "siglip_vision_model"}},
     r"a 'clip' config needs a clip_vision_model vision_config"),
])
def test_vit_config_from_hf_rejects_unsupported(config, match):
  with pytest.raises(ValueError, match=match):
    VitConfig.from_hf(config)


def test_vit_loading_rejects_unsupported_architecture(checkpoint):
  config = json.loads((checkpoint("vit")[0] / "config.json").read_text())
  config["architectures"] = ["ViTForImageClassification"]
  with pytest.raises(UnsupportedModelError, match=r"\['ViTForImageClassification'\] are not "
                     r"supported"):
    load_model(config, [])


def test_vit_random_init_runs():
  """A Vit built directly (random init, no checkpoint) gives the documented shapes."""
  config = VitConfig(variant="dinov2", hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, image_size=32, patch_size=8, num_register_tokens=2)
  out = Vit(config, rngs=nnx.Rngs(0))(jnp.ones((1, 24, 40, 3)))
  assert out.last_hidden_state.shape == (1, 1 + 2 + 3 * 5, 32)
  assert select_features(out, pooling="patch_grid").shape == (1, 3, 5, 32)
  assert bool(jnp.isfinite(out.pooler_output).all())
