"""Parity of the SigLIP2 vision towers with transformers' torch SigLIP2 / SigLIP, and the family
through the zoo, the C score, extraction and a VLM.

NaFlex (``siglip2`` model_type): tiny random ``Siglip2VisionModel`` / ``Siglip2Model`` checkpoints
(4 x 4 position grid, 4-pixel patches, every parameter randomised) saved with ``save_pretrained``
and a ``Siglip2ImageProcessorPil`` config (budget ``MAX_PATCHES``), loaded through
``load_pretrained`` and ``zoo.load``. Fixed-resolution SigLIP2 checkpoints are ``siglip``
model_type on the Hub: one such directory goes through the zoo too. Photos are scikit-image's.

Tolerance: every compared float32 tensor has max abs error <= ``RTOL`` x max |reference|
(``RTOL`` = 1e-4); the preprocessing is compared to 1e-6 absolute, its shapes and masks exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from huggingface_hub import constants as hf_constants
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.siglip2 import image_processing_pil_siglip2 as hf_naflex

import hub_fixtures as hf
import parity_util
from vlmsel_jax import zoo
from vlmsel_jax.features import extraction
from vlmsel_jax.features import feature_bank as fb
from vlmsel_jax.features import patch_grid as patch_grid_lib
from vlmsel_jax.models import HFDirectory, attention, llama, load_pretrained, siglip2, vit
from vlmsel_jax.models.vlm import modeling as vlm
from vlmsel_jax.scoring import c_score

skimage_data = pytest.importorskip("skimage.data", reason="sample photos need scikit-image")

RTOL = 1e-4
PATCH = 4
MAX_PATCHES = 24  # A square photo: 4 x 4 patches (16 px), 8 of padding.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              patch_size=PATCH, num_patches=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=64)
HUB_ID = "vlmsel-test/siglip2-naflex-tiny"


def _rel(ref: np.ndarray) -> float:
  return RTOL * float(np.abs(ref).max())


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Every parameter random: norm scales 1 + noise, everything else noise, so a mis-routed,
  unused or swapped tensor changes the outputs."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = name.endswith("weight") and "norm" in name
      p.copy_(torch.randn_like(p) * (0.2 if is_scale else 0.1) + (1.0 if is_scale else 0.0))
  return model.eval()


def _processor(**overrides) -> hf_naflex.Siglip2ImageProcessorPil:
  return hf_naflex.Siglip2ImageProcessorPil(
      **{"patch_size": PATCH, "max_num_patches": MAX_PATCHES, **overrides})


@functools.cache
def _photo(name: str) -> Image.Image:
  image = getattr(skimage_data, name)()
  return Image.fromarray(image).convert("RGB")


def _wide_and_tall() -> list[Image.Image]:
  """Two photos of different aspect ratios: chelsea (300 x 451: 4 x 6 patches, no padding) and a
  tall astronaut crop (512 x 120: 9 x 2 patches, 6 of padding)."""
  return [_photo("chelsea"), _photo("astronaut").crop((150, 0, 270, 512))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(kind) -> (directory, torch vision tower); kind "vision" (Siglip2VisionModel) or
  "contrastive" (a full Siglip2Model). Saved once, with the processor's config."""

  @functools.cache
  def make(kind):
    path = tmp_path_factory.mktemp(kind)
    if kind == "vision":
      config = transformers.Siglip2VisionConfig(**VISION)
      model = _randomise(transformers.Siglip2VisionModel(config))
      tower = model
    else:
      model = _randomise(transformers.Siglip2Model(
          transformers.Siglip2Config(vision_config=VISION, text_config=TEXT)))
      tower = model.vision_model
    model.save_pretrained(path)
    _processor().save_pretrained(path)
    return path, tower

  return make


def _torch_outputs(tower, **inputs) -> dict:
  with torch.no_grad():
    out = tower(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()},
                output_hidden_states=True)
  return {"hidden_states": [h.numpy() for h in out.hidden_states],
          "last_hidden_state": out.last_hidden_state.numpy(),
          "pooler_output": None if out.pooler_output is None else out.pooler_output.numpy()}


_naflex = nnx.jit(lambda model, inputs: model.naflex(**inputs))
_forward = nnx.jit(lambda model, x: model(x))


def _patchify(x: np.ndarray) -> np.ndarray:
  """NHWC images → (b, patches, p * p * c) in NaFlex's order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // PATCH) * (w // PATCH), -1)


def test_siglip2_parity_naflex_padded_batch_of_two_aspect_ratios(checkpoint):
  path, tower = checkpoint("vision")
  model = load_pretrained(path)
  assert isinstance(model, siglip2.Siglip2Vit) and not model.config.contrastive
  processor = json.loads((path / "preprocessor_config.json").read_text())
  inputs = siglip2.NaflexPreprocessing.from_hf(processor).batch(_wide_and_tall())
  shapes, mask = inputs["spatial_shapes"], inputs["pixel_attention_mask"]
  assert shapes.tolist() == [[4, 6], [9, 2]] and mask.sum(1).tolist() == [24, 18]
  out = _naflex(model, {k: jnp.asarray(v) for k, v in inputs.items()})
  ref = _torch_outputs(tower, **inputs)
  parity_util.assert_outputs_match(out, ref, tol_of=_rel)
  # The mean leaves the padding out; the pooler is the head's (which masks it too).
  real = mask[..., None].astype(np.float32)
  want = (ref["last_hidden_state"] * real).sum(1) / real.sum(1)
  got = np.asarray(siglip2.select_naflex_features(out, layer=None, pooling="mean"))
  np.testing.assert_allclose(got, want, atol=_rel(want))
  got = np.asarray(siglip2.select_naflex_features(out, pooling="pooler"))
  np.testing.assert_allclose(got, ref["pooler_output"], atol=_rel(ref["pooler_output"]))


def test_siglip2_full_model_loads_as_its_vision_tower(checkpoint, tmp_path):
  """A full Siglip2Model directory loads the ``vision_model.`` weights, the text tower and
  ``logit_scale`` / ``logit_bias`` skipped: the parameters of that tower saved alone."""
  path, tower = checkpoint("contrastive")
  keys = {k for k, _ in HFDirectory(path)}
  assert {"logit_scale", "logit_bias"} <= keys and any(k.startswith("text_model.") for k in keys)
  tower.save_pretrained(tmp_path)
  full, alone = load_pretrained(path), load_pretrained(tmp_path)
  assert full.config.contrastive and not alone.config.contrastive
  assert dataclasses.replace(full.config, contrastive=False) == alone.config
  full, alone = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (full, alone))
  assert jax.tree.structure(full) == jax.tree.structure(alone)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(alone), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_siglip2_naflex_preprocessing_matches_transformers():
  sizes = [(h, w) for h in (1, 7, 33, 300, 512) for w in (1, 16, 97, 451, 2000)]
  for budget, patch in ((24, 4), (256, 16), (64, 14)):
    for h, w in sizes:
      want = hf_naflex.get_image_size_for_max_num_patches(h, w, patch, budget)
      assert siglip2.naflex_image_size(h, w, patch, budget) == tuple(want), (h, w, budget)
  images = _wide_and_tall() + [_photo("camera"), _photo("coffee")]  # camera is greyscale.
  for budget, patch in ((MAX_PATCHES, PATCH), (256, 16)):
    ours = siglip2.NaflexPreprocessing(patch_size=patch, max_num_patches=budget).batch(images)
    ref = _processor(patch_size=patch, max_num_patches=budget)(images, return_tensors="np")
    np.testing.assert_array_equal(ours["spatial_shapes"], ref["spatial_shapes"])
    np.testing.assert_array_equal(ours["pixel_attention_mask"], ref["pixel_attention_mask"])
    assert ours["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], atol=1e-6)


def test_siglip2_position_resize_matches_torch_interpolate():
  table = np.random.RandomState(0).randn(25, 3).astype(np.float32)  # A 5 x 5 grid.
  grid = torch.tensor(table.reshape(5, 5, 3).transpose(2, 0, 1)[None])
  sizes = [(5, 5), (3, 7), (9, 2), (1, 1), (16, 11), (2, 13)]
  length = max(h * w for h, w in sizes) + 3
  # One call for every size, as a jitted padded batch runs it.
  resize = jax.jit(siglip2.resize_positions, static_argnums=2)
  got = np.asarray(resize(jnp.asarray(table), jnp.asarray(sizes), length))
  for i, (h, w) in enumerate(sizes):
    ref = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear",
                                          align_corners=False, antialias=True)
    ref = ref[0].numpy().transpose(1, 2, 0).reshape(h * w, 3)
    np.testing.assert_allclose(got[i, :h * w], ref, atol=1e-5, err_msg=f"size {(h, w)}")
    # The padding repeats the first position, as transformers fills it.
    np.testing.assert_array_equal(got[i, h * w:], np.broadcast_to(got[i, :1], (length - h * w, 3)))


def test_siglip2_nhwc_input_on_any_grid_matches_transformers(checkpoint):
  """NHWC images of one size (here 3 x 5 patches, off the 4 x 4 position grid), no padding."""
  path, tower = checkpoint("vision")
  model = load_pretrained(path)
  x = np.random.RandomState(1).randn(2, 12, 20, 3).astype(np.float32)
  out = _forward(model, jnp.asarray(x))
  assert out.grid == (3, 5) and out.num_prefix_tokens == 0
  ref = _torch_outputs(tower, pixel_values=_patchify(x), spatial_shapes=np.array([[3, 5]] * 2),
                       pixel_attention_mask=np.ones((2, 15), np.int32))
  parity_util.assert_outputs_match(out, ref, tol_of=_rel)
  grid = np.asarray(vit.select_features(out, 0, "patch_grid"))
  np.testing.assert_allclose(grid, ref["hidden_states"][0].reshape(2, 3, 5, 32),
                             atol=_rel(ref["hidden_states"][0]))
  with pytest.raises(ValueError, match=r"\(13\*20\) is not a positive multiple of the patch"):
    model(jnp.zeros((1, 13, 20, 3)))


def test_siglip2_zoo_fixed_grid_features_and_patch_grid(checkpoint):
  """zoo.load: every image at the square grid a square photo gets from transformers' processor
  (4 x 4 here); on a square photo the zoo's features are transformers' NaFlex outputs."""
  path, tower = checkpoint("vision")
  loaded = zoo.load(str(path))
  assert loaded.kind == "vision" and isinstance(loaded.model, siglip2.Siglip2Vit)
  assert loaded.preprocessing.image_size == (16, 16) and loaded.num_layers == 3
  assert loaded.poolings == ("mean", "pooler")
  photo = _photo("astronaut")
  pixels = loaded.preprocessing(photo)[None]
  ref_inputs = _processor()([photo], return_tensors="np")
  assert tuple(ref_inputs["spatial_shapes"][0]) == (4, 4)
  np.testing.assert_allclose(_patchify(pixels)[0], ref_inputs["pixel_values"][0, :16], atol=1e-6)
  ref = _torch_outputs(tower, **ref_inputs)  # 8 padding patches, masked: the same real tokens.
  # The C score's and the VLM's grid: second-to-last layer by default, row-major 4 x 4.
  assert patch_grid_lib.default_layer(loaded) == -2

  @nnx.jit
  def readings(model, pixels):
    inputs = {"pixels": pixels}
    return (loaded.features(model, inputs, -1, "pooler"), loaded.features(model, inputs, 1, "mean"),
            patch_grid_lib.patch_grid(dataclasses.replace(loaded, model=model), pixels))

  pooled, mean, grid = (np.asarray(a) for a in readings(loaded.model, pixels))
  np.testing.assert_allclose(pooled, ref["pooler_output"], atol=_rel(ref["pooler_output"]))
  want = ref["hidden_states"][1][:, :16].mean(1)
  np.testing.assert_allclose(mean, want, atol=_rel(want))
  want = ref["hidden_states"][-2][:, :16].reshape(1, 4, 4, 32)
  np.testing.assert_allclose(grid, want, atol=_rel(want))


def test_siglip2_variants_and_hub_id(checkpoint, tmp_path, monkeypatch):
  path, _ = checkpoint("contrastive")
  cache = tmp_path / "hub"
  hf.add_snapshot(cache, HUB_ID, path)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  assert zoo.resolve(HUB_ID).kind == "vision"
  loaded = zoo.load(f"{HUB_ID}@res=24,layer=1")
  assert loaded.name == f"{HUB_ID}@layer=1,res=24" and loaded.default_layer == 1
  assert loaded.preprocessing.image_size == (24, 24)
  pixels = loaded.preprocessing(_photo("chelsea"))[None]
  grid = jax.eval_shape(lambda x: patch_grid_lib.patch_grid(loaded, x, layer=1), pixels)
  assert grid.shape == (1, 6, 6, 32)
  with pytest.raises(zoo.ZooError, match=r"res=10 is not a multiple of the SigLIP2 NaFlex patch "
                     r"size 4"):
    zoo.load(f"{path}@res=10")
  with pytest.raises(zoo.ZooError, match=r"layer 3 is out of range"):
    zoo.load(f"{path}@layer=3")


def test_siglip2_extraction_and_c_score(checkpoint, tmp_path):
  path, _ = checkpoint("vision")
  folder = tmp_path / "photos"
  folder.mkdir()
  names = ("chelsea", "coffee", "camera")
  with open(folder / "captions.jsonl", "w", encoding="utf-8") as f:
    for i, name in enumerate(names):
      _photo(name).save(folder / f"{name}.png")
      f.write(json.dumps({"id": i, "image": f"{name}.png", "caption": name}) + "\n")
  options = extraction.ExtractOptions(batch_size=2, progress=False)  # Two batches, one padded.
  (result,) = extraction.extract([str(path)], str(folder), str(tmp_path / "banks"),
                                 options=options)
  bank = fb.load_bank(result.path)
  loaded = zoo.load(str(path))
  pixels = np.stack([loaded.preprocessing(_photo(n)) for n in names])
  features = nnx.jit(loaded.features, static_argnums=(2, 3))
  want = np.asarray(features(loaded.model, {"pixels": pixels}, -1, "mean"))
  assert bank.features.shape == (3, 32)
  np.testing.assert_allclose(bank.features, want, atol=_rel(want))
  scores = c_score.cached_c_scores([str(path)], str(tmp_path / "cache"), progress=False, seed=0,
                                   homography_images=("astronaut",), pairs_per_image=1,
                                   num_keypoints=8)
  (result,) = scores.values()
  assert result["grid"] == [4, 4] and result["layer"] == -2
  assert 0.0 <= result["c_score"] <= 100.0


def _tiny_llm() -> llama.Llama:
  """A random 1-layer Llama; weights drawn in NumPy (an eager jax init compiles every op)."""
  config = llama.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.asarray(rng.normal(scale=0.3, size=x.shape), x.dtype), state))


def test_siglip2_tower_in_a_vlm_attention_paths_and_remat(checkpoint):
  """A tiny VLM forward with the tower (16 image tokens: the 4 x 4 grid), and on a padded
  NaFlex batch: the fused attention path masks the keys the einsum path (rematerialized: the mask
  goes through ``jax.checkpoint``) does, and the backward pass gives the padding no gradient. One
  compiled function runs it all."""
  path, _ = checkpoint("vision")
  model = vlm.VLM(load_pretrained(path), _tiny_llm(), vlm.VLMConfig(vision_layer=-2),
                  image_size=(16, 16), rngs=nnx.Rngs(1))
  assert model.num_image_tokens == 16 and model.vision_dim == 32
  rng = np.random.default_rng(2)
  pixels = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 40, (2, 20)))
  image_mask = jnp.zeros((2, 20), bool).at[:, 1:17].set(True)
  inputs = siglip2.NaflexPreprocessing(patch_size=PATCH, max_num_patches=MAX_PATCHES).batch(
      _wide_and_tall())
  inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  graphdef, state = nnx.split(model)

  def naflex(state, patches, **settings):
    tower = attention.configure(nnx.merge(graphdef, state).tower, **settings)
    return tower.naflex(patches, inputs["spatial_shapes"], inputs["pixel_attention_mask"])

  def loss(patches, state):
    out = naflex(state, patches, attention_impl="einsum", remat=True)
    return jnp.sum(out.pooler_output ** 2), out

  @jax.jit
  def run(state):
    logits = nnx.merge(graphdef, state)(pixels, ids, jnp.ones((2, 20), jnp.int32), image_mask)
    patches = inputs["pixel_values"]
    (_, einsum), grads = jax.value_and_grad(loss, has_aux=True)(patches, state)
    return logits, einsum, naflex(state, patches, attention_impl="fused"), grads

  grad_jaxpr = jax.make_jaxpr(lambda s: jax.grad(loss, has_aux=True)(inputs["pixel_values"], s))
  assert "remat" in str(grad_jaxpr(state))
  logits, einsum, fused, grads = (jax.tree.map(np.asarray, x) for x in run(state))
  assert logits.shape == (2, 20, 40) and np.isfinite(logits).all()
  for a, b in zip(jax.tree.leaves(einsum), jax.tree.leaves(fused), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  assert np.abs(grads[1, :18]).max() > 0 and not np.abs(grads[1, 18:]).any()


def test_siglip2_fixed_resolution_checkpoints_are_siglip(tmp_path):
  """The Hub's fixed-resolution SigLIP2 (``google/siglip2-base-patch16-224``, ...) are ``siglip``
  SiglipModel checkpoints with a bilinear SiglipImageProcessor: ``vit.Vit`` in the zoo."""
  torch_model = _randomise(transformers.SiglipModel(transformers.SiglipConfig(
      vision_config=dict(VISION, image_size=16, num_patches=None), text_config=TEXT)))
  torch_model.save_pretrained(tmp_path)
  processor = {"do_normalize": True, "do_rescale": True, "do_resize": True,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
               "rescale_factor": 1 / 255, "size": {"height": 16, "width": 16},
               "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor"}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
  loaded = zoo.load(str(tmp_path))
  assert type(loaded.model) is vit.Vit and loaded.model.config.contrastive
  photo = _photo("coffee")
  pixels = loaded.preprocessing(photo)[None]
  ref_pixels = SiglipImageProcessorPil(**{k: v for k, v in processor.items() if "class" not in k
                                          and "type" not in k})([photo], return_tensors="np")
  np.testing.assert_allclose(pixels, ref_pixels["pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)
  ref = _torch_outputs(torch_model.vision_model, pixel_values=ref_pixels["pixel_values"])
  parity_util.assert_outputs_match(_forward(loaded.model, jnp.asarray(pixels)), ref, tol_of=_rel)


@pytest.mark.parametrize("config, match", [
    ({"model_type": "siglip2_vision_model", "num_patches": 20}, r"num_patches 20 is not a square"),
    ({"model_type": "siglip2", "vision_config": {"model_type": "siglip_vision_model"}},
     r"needs a siglip2_vision_model vision_config"),
    ({"model_type": "siglip2_vision_model", "hidden_act": "relu"},
     r"hidden_act 'relu' is not supported"),
    ({"model_type": "siglip"}, r"model_type 'siglip' is not SigLIP2 NaFlex"),
])
def test_siglip2_config_from_hf_rejects_unsupported(config, match):
  with pytest.raises(ValueError, match=match):
    siglip2.config_from_hf(config)


def test_siglip2_config_from_hf_reads_hub_defaults():
  c = siglip2.config_from_hf({"model_type": "siglip2", "architectures": ["Siglip2Model"],
                              "vision_config": {}})
  assert (c.variant, c.contrastive, c.hidden_size, c.num_layers, c.patch_size, c.grid) == (
      "siglip", True, 768, 12, (16, 16), (16, 16))
  assert (c.hidden_act, c.pooler, c.model_type) == ("gelu_pytorch_tanh", True,
                                                    "siglip2_vision_model")
