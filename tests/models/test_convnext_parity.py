"""Parity of the NNX ConvNeXt with transformers' ``ConvNextModel`` and OpenCLIP's ConvNeXt towers.

Every reference is a tiny random torch model (every weight, LayerNorm and layer scale
randomised: the default layer scale of 1e-6 would hide the blocks) saved to disk in its own
format: ``save_pretrained`` for transformers (``ConvNextModel`` and
``ConvNextForImageClassification``), the Hub layout for OpenCLIP (``open_clip_config.json`` and
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, written from the state dict
of ``open_clip.create_model``, which reads it back strictly). Ours loads those files through
``zoo.load``. Torch takes NCHW images, ours NHWC.

Tolerance: every compared float32 tensor within ``REL_TOL`` = 1e-4 of its reference's largest
magnitude (at least 1), as a max abs error. Preprocessing is compared against transformers'
``ConvNextImageProcessorPil`` (1e-6); OpenCLIP's transform needs torchvision, which cannot be
imported here (its compiled operators need a CUDA torch), so it is compared against a direct
PIL + NumPy statement of torchvision's ``Resize`` / ``CenterCrop`` / ``ToTensor`` / ``Normalize``.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from huggingface_hub import constants as hf_constants
from PIL import Image
from safetensors.torch import save_file

import hub_fixtures
import references
from vlmsel_jax import zoo
from vlmsel_jax.features import patch_grid as patch_grid_lib
from vlmsel_jax.models import checkpoint, convnext, llama, transforms, vlm
from vlmsel_jax.models.efficientnet import DepthwiseConv
from vlmsel_jax.zoo import hub as hub_lib
from vlmsel_jax.zoo import preprocessing as prep_lib

REL_TOL = 1e-4
PREP_ATOL = 1e-6
BATCH = 2
SIZE = 64
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
# name -> (timm_model_name, timm_proj, weights file). test_convnext2 / 3 are timm's own tiny
# models (one block a stage; 3 has depthwise kernels 7, 5, 5, 3 and SiLU, 2 tanh-GELU).
OPEN_CLIP_CASES = {
    "linear_safetensors": ("test_convnext2", "linear", "open_clip_model.safetensors"),
    "mlp_bin": ("test_convnext3", "mlp", "open_clip_pytorch_model.bin"),
}
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                  "resize_mode": "shortest"}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter random: weights scaled by 1/sqrt(fan-in), norm scales and layer scales
  around 1, biases small; returns the model in eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise / p[0].numel() ** 0.5)
      elif name.endswith(("gamma", "layer_scale_parameter")):
        p.copy_(0.5 + 0.2 * noise)
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


def _assert_close(name: str, ours, ref) -> None:
  ours = np.asarray(ours, np.float32)
  assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
  err = float(np.abs(ours - ref).max())
  tol = REL_TOL * max(1.0, float(np.abs(ref).max()))
  assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


def _pixels(size: int = SIZE, seed: int = 1) -> np.ndarray:
  """A random NCHW float32 batch, the layout torch takes."""
  return np.random.RandomState(seed).randn(BATCH, 3, size, size).astype(np.float32)


def _nhwc(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 2, 3, 1)


# One compiled forward per model shape and input size, shared by the tests.
_forward = nnx.jit(lambda model, x: model(x))


def _grouped_conv(model):
  """``model`` with XLA's grouped convolution for its depthwise convolutions, which compiles in
  half the time of the shifted sums. The shifted sums (the CPU default) are what the
  transformers tests run; efficientnet's tests check that the two agree."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, DepthwiseConv):
      node.impl = "conv"
  return model


def _hf_torch_model(kind: str) -> torch.nn.Module:
  torch.manual_seed(0)
  config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                       image_size=SIZE, num_labels=5)
  cls = {"model": transformers.ConvNextModel,
         "classifier": transformers.ConvNextForImageClassification}[kind]
  return _randomise(cls(config), seed=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """hf_dir(kind) -> (directory, torch ConvNextModel): saved once per module."""

  @functools.cache
  def make(kind):
    model = _hf_torch_model(kind)
    path = tmp_path_factory.mktemp(f"convnext_{kind}")
    model.save_pretrained(path)
    transformers.ConvNextImageProcessorPil(size={"shortest_edge": SIZE}, crop_pct=0.875,
                                           **IMAGENET).save_pretrained(path)
    return path, (model.convnext if kind == "classifier" else model)

  return make


def _open_clip():
  return references.import_reference("open_clip")


def _open_clip_config(timm_name: str, proj: str) -> dict:
  return {
      "model_cfg": {
          "embed_dim": 16,
          "vision_cfg": {"timm_model_name": timm_name, "timm_model_pretrained": False,
                         "timm_pool": "", "timm_proj": proj, "timm_drop": 0.0,
                         "timm_drop_path": 0.1, "image_size": SIZE},
          "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                       "layers": 1},
      },
      "preprocess_cfg": PREPROCESS_CFG,
  }


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
  """open_clip_dir(case) -> (directory in the Hub layout, torch CLIP model)."""
  open_clip = _open_clip()

  @functools.cache
  def make(case):
    timm_name, proj, weights = OPEN_CLIP_CASES[case]
    path = tmp_path_factory.mktemp(f"open_clip_{case}")
    with open(path / "open_clip_config.json", "w", encoding="utf-8") as f:
      json.dump(_open_clip_config(timm_name, proj), f)
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{path}", load_weights=False)
    _randomise(model.visual, seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
      save_file(state, path / weights)
    else:
      torch.save(state, path / weights)
    # OpenCLIP reads the directory back strictly: the layout is the one it loads.
    reloaded = open_clip.create_model(f"local-dir:{path}").eval()
    x = torch.tensor(_pixels())
    with torch.no_grad():
      np.testing.assert_array_equal(reloaded.encode_image(x).numpy(),
                                    model.eval().encode_image(x).numpy())
    return path, model.eval()

  return make


# ---------------------------------------------------------------------------------------------
# transformers.


@pytest.mark.parametrize("kind", ["model", "classifier"])
def test_hf_convnext_parity_every_hidden_state_and_pooler(hf_dir, kind):
  path, torch_model = hf_dir(kind)
  loaded = zoo.load(str(path))
  assert isinstance(loaded.model, convnext.ConvNext) and loaded.kind == "vision"
  assert (loaded.num_layers, loaded.poolings, loaded.default_layer,
          loaded.default_pooling) == (5, ("mean", "pooler"), -1, "mean")
  x = _pixels()
  with torch.no_grad():
    ref = torch_model(torch.tensor(x), output_hidden_states=True)
  out = _forward(loaded.model, _nhwc(x))
  # The stem's output, then each of the four stages'.
  assert len(out.hidden_states) == len(ref.hidden_states) == 5
  for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    _assert_close(f"hidden_states[{i}]", a, _nhwc(b))
  _assert_close("pooler_output", out.pooler_output, ref.pooler_output.numpy())
  assert out.hidden_states[-1].shape == (BATCH, 2, 2, 32) and out.image_embeds is None
  # The randomisation makes the comparison meaningful: the blocks change the stream.
  assert float(np.std(ref.pooler_output.numpy())) > 0.1
  _assert_close("select_features(pooler)", convnext.select_features(out, pooling="pooler"),
                ref.pooler_output.numpy())
  _assert_close("select_features(2, mean)", convnext.select_features(out, 2, "mean"),
                _nhwc(ref.hidden_states[2]).mean(axis=(1, 2)))


def test_hf_convnext_preprocessing_matches_the_image_processor(hf_dir):
  path, _ = hf_dir("model")
  loaded = zoo.load(str(path))
  rng = np.random.default_rng(4)
  image = Image.fromarray(rng.integers(0, 256, (75, 97, 3), dtype=np.uint8))
  want = transformers.AutoImageProcessor.from_pretrained(path)(image)["pixel_values"][0]
  got = loaded.preprocessing(image)
  assert loaded.preprocessing.shortest_edge == int(SIZE / 0.875)
  np.testing.assert_allclose(got, want.transpose(1, 2, 0), atol=PREP_ATOL)
  # From 384 on the processor warps to a square instead of cropping.
  processor = {"size": {"shortest_edge": 384}, "crop_pct": 0.875, **IMAGENET}
  want = transformers.ConvNextImageProcessorPil(**processor)(image)["pixel_values"][0]
  got = prep_lib.preprocessing_from_convnext(processor, 224)(image)
  np.testing.assert_allclose(got, want.transpose(1, 2, 0), atol=PREP_ATOL)
  # @res=: the processor at that shortest_edge.
  at_48 = zoo.load(f"{path}@res=48").preprocessing
  want = transformers.ConvNextImageProcessorPil(size={"shortest_edge": 48}, crop_pct=0.875,
                                                **IMAGENET)(image)["pixel_values"][0]
  np.testing.assert_allclose(at_48(image), want.transpose(1, 2, 0), atol=PREP_ATOL)
  with pytest.raises(zoo.ZooError, match=r"do_resize=false is not supported"):
    prep_lib.preprocessing_from_convnext({"do_resize": False}, 224)


# ---------------------------------------------------------------------------------------------
# OpenCLIP.


@pytest.mark.parametrize("case", list(OPEN_CLIP_CASES))
def test_open_clip_parity_trunk_stages_and_image_embedding(open_clip_dir, case):
  path, torch_model = open_clip_dir(case)
  resolved = zoo.resolve(str(path))
  assert resolved.kind == "vision"
  loaded = resolved.load()
  config = loaded.model.config
  assert (config.weights_format, config.projection, config.embed_dim) == (
      "open_clip", OPEN_CLIP_CASES[case][1], 16)
  assert loaded.poolings == ("mean", "pooler", "embedding")
  assert loaded.default_pooling == "mean"
  x = _pixels()
  trunk = torch_model.visual.trunk
  with torch.no_grad():
    xt = torch.tensor(x)
    stages = [trunk.stem(xt)]
    for stage in trunk.stages:
      stages.append(stage(stages[-1]))
    embedding = torch_model.encode_image(xt).numpy()
    pooled = trunk(xt).numpy()  # global pool, then the head's LayerNorm
  out = _forward(_grouped_conv(loaded.model), _nhwc(x))
  assert len(out.hidden_states) == 5
  for i, (a, b) in enumerate(zip(out.hidden_states, stages)):
    _assert_close(f"hidden_states[{i}]", a, _nhwc(b))
  _assert_close("pooler_output", out.pooler_output, pooled)
  _assert_close("image_embeds", out.image_embeds, embedding)
  assert float(np.std(embedding)) > 0.05
  _assert_close("select_features(embedding)",
                convnext.select_features(out, pooling="embedding"), embedding)


def _torchvision_shortest_then_center_crop(image: Image.Image, size: int, mean, std):
  """torchvision's Resize(size) + CenterCrop(size) + ToTensor + Normalize, written out."""
  w, h = image.size
  if w <= h:
    new = (size, int(size * h / w))
  else:
    new = (int(size * w / h), size)
  if new != image.size:
    image = image.resize(new, resample=Image.Resampling.BICUBIC)
  x = np.asarray(image)
  top = int(round((x.shape[0] - size) / 2.0))
  left = int(round((x.shape[1] - size) / 2.0))
  x = x[top:top + size, left:left + size].astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def test_open_clip_preprocessing_matches_a_direct_statement_of_its_transform(open_clip_dir):
  path, torch_model = open_clip_dir("linear_safetensors")
  loaded = zoo.load(str(path))
  assert torch_model.visual.preprocess_cfg["resize_mode"] == "shortest"
  assert tuple(torch_model.visual.image_size) == loaded.preprocessing.image_size == (SIZE, SIZE)
  rng = np.random.default_rng(5)
  # 89 x 80 -> 71 x 64: a 7 px margin, where torchvision's round(3.5) = 4 and floor gives 3.
  image = Image.fromarray(rng.integers(0, 256, (80, 89, 3), dtype=np.uint8))
  want = _torchvision_shortest_then_center_crop(image, SIZE, PREPROCESS_CFG["mean"],
                                                PREPROCESS_CFG["std"])
  np.testing.assert_allclose(loaded.preprocessing(image), want, atol=PREP_ATOL)
  at_48 = zoo.load(f"{path}@res=48").preprocessing
  want = _torchvision_shortest_then_center_crop(image, 48, PREPROCESS_CFG["mean"],
                                                PREPROCESS_CFG["std"])
  np.testing.assert_allclose(at_48(image), want, atol=PREP_ATOL)
  # "squash": Resize((size, size)), no crop, bilinear here.
  squash = prep_lib.preprocessing_from_open_clip(
      {**PREPROCESS_CFG, "resize_mode": "squash", "interpolation": "bilinear"}, SIZE)
  x = np.asarray(image.resize((SIZE, SIZE), resample=Image.Resampling.BILINEAR), np.float32)
  want = (x / np.float32(255.0) - np.asarray(PREPROCESS_CFG["mean"], np.float32)) / np.asarray(
      PREPROCESS_CFG["std"], np.float32)
  np.testing.assert_allclose(squash(image), want, atol=PREP_ATOL)
  with pytest.raises(zoo.ZooError, match=r"x\.json: resize_mode 'longest' is not supported"):
    prep_lib.preprocessing_from_open_clip({"resize_mode": "longest"}, SIZE, "x.json")


@pytest.mark.parametrize("vision_cfg, match", [
    ({"layers": 2, "width": 32, "patch_size": 8, "image_size": 32},
     r"the vision tower is not a timm model \(no vision_cfg\.timm_model_name\), so not a "
     r"ConvNeXt"),
    ({"timm_model_name": "resnet50", "timm_proj": "linear"},
     r"vision tower 'resnet50' is not a supported ConvNeXt"),
    ({"timm_model_name": "convnext_base", "timm_pool": "", "timm_proj": "none"},
     r"timm_pool '' / timm_proj 'none' is not implemented"),
])
def test_open_clip_configs_of_other_towers_are_refused_in_one_line(tmp_path, vision_cfg, match):
  config = {"model_cfg": {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": {}}}
  (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
  (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
  with pytest.raises(checkpoint.UnsupportedModelError) as info:
    zoo.resolve(str(tmp_path))
  message = str(info.value)
  assert message.startswith(f"{tmp_path / 'open_clip_config.json'}: ") and "\n" not in message
  assert len(re.findall(match, message)) == 1, message


def test_open_clip_checkpoint_problems_are_listed(open_clip_dir, tmp_path):
  path, torch_model = open_clip_dir("linear_safetensors")
  state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
  del state["visual.trunk.stages.2.blocks.0.gamma"]
  state["visual.trunk.head.fc.weight"] = torch.zeros(3, 128)
  (tmp_path / "open_clip_config.json").write_text((path / "open_clip_config.json").read_text())
  save_file(state, tmp_path / "open_clip_model.safetensors")
  with pytest.raises(checkpoint.CheckpointError) as info:
    zoo.load(str(tmp_path))
  message = str(info.value)
  assert "missing parameter stages.2.blocks.0.gamma" in message
  assert "unexpected key 'visual.trunk.head.fc.weight' (3, 128): not in the key table" in message


def test_open_clip_hub_repo_resolves_offline_from_the_cache(open_clip_dir, tmp_path,
                                                            monkeypatch):
  path, torch_model = open_clip_dir("linear_safetensors")
  repo = "vlmsel-test/convnext-open-clip"
  commit = hub_fixtures.add_snapshot(tmp_path / "hub", repo, path)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  assert "open_clip_config.json" in hub_lib.CONFIG_PATTERNS
  resolved = zoo.resolve(f"{repo}@layer=-2")
  assert (resolved.kind, resolved.hub.commit, resolved.name) == ("vision", commit,
                                                                 f"{repo}@layer=-2")
  loaded = resolved.load()
  assert loaded.default_layer == -2
  x = _pixels()
  with torch.no_grad():
    embedding = torch_model.encode_image(torch.tensor(x)).numpy()
  _assert_close("image_embeds", _forward(_grouped_conv(loaded.model), _nhwc(x)).image_embeds,
                embedding)
  # A snapshot of an OpenCLIP repo without its weights is one line.
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "open_clip_config.json").write_text((path / "open_clip_config.json").read_text())
  hub_fixtures.add_snapshot(tmp_path / "hub", "vlmsel-test/bare", bare)
  with pytest.raises(zoo.ZooError, match=r"the cached OpenCLIP snapshot .* has no weights "
                     r"\(open_clip_model\.safetensors or open_clip_pytorch_model\.bin\)"):
    zoo.resolve("vlmsel-test/bare")


# ---------------------------------------------------------------------------------------------
# Variants, patch grids and the VLM.


def test_convnext_variants_and_patch_grid(hf_dir):
  path, torch_model = hf_dir("model")
  loaded = zoo.load(f"{path}@layer=-2,res=96")
  assert loaded.default_layer == -2 and loaded.preprocessing.image_size == (96, 96)
  assert patch_grid_lib.default_layer(loaded) == convnext.ConvNext.GRID_DEFAULT_LAYER == -1
  pixels = jax.ShapeDtypeStruct((BATCH, 96, 96, 3), jnp.float32)
  assert jax.eval_shape(patch_grid_lib.patch_grid_fn(loaded), pixels).shape == (BATCH, 3, 3, 32)
  # Values at an early layer, which compiles only the stem and two stages.
  x = _pixels(96)
  with torch.no_grad():
    ref = torch_model(torch.tensor(x), output_hidden_states=True).hidden_states[1]
  _grouped_conv(loaded.model)
  _assert_close("patch_grid(1)", patch_grid_lib.patch_grid_fn(loaded, 1)(_nhwc(x)), _nhwc(ref))
  assert ref.shape == (BATCH, 8, 24, 24)
  with pytest.raises(zoo.ZooError, match=r"layer 5 is out of range \(the model has 5 hidden "
                     r"states: -5 \.\. 4\)"):
    zoo.load(f"{path}@layer=5")
  with pytest.raises(ValueError, match=r"images of 16x16 px are too small: this ConvNeXt needs "
                     r"at least 32 px a side"):
    loaded.model(jnp.zeros((1, 16, 16, 3)))


def test_select_features_errors():
  out = convnext.ConvNextOutput(hidden_states=(jnp.zeros((1, 2, 2, 4)),),
                                pooler_output=jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match=r"pooling='embedding' needs an OpenCLIP tower"):
    convnext.select_features(out, pooling="embedding")
  with pytest.raises(ValueError, match=r"pooling='pooler' reads the pooled output"):
    convnext.select_features(out, layer=0, pooling="pooler")
  with pytest.raises(ValueError, match=r"pooling 'cls' is not one of mean, patch_grid"):
    convnext.select_features(out, pooling="cls")
  with pytest.raises(ValueError, match=r"hidden_act 'mish' is not one of gelu"):
    convnext.ConvNextConfig(hidden_act="mish")


def _tiny_vlm(tower: convnext.ConvNext) -> vlm.VLM:
  """A VLM of ``tower``, a random 1-layer Llama and a random projector.

  Built abstractly and filled from NumPy: eager random initialisation compiles every random op
  anew, which would cost this test more than everything it checks.
  """
  config = llama.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
  abstract = nnx.eval_shape(lambda: vlm.VLM(
      convnext.ConvNext(tower.config, rngs=nnx.Rngs(0)), llama.Llama(config, rngs=nnx.Rngs(0)),
      vlm.VLMConfig(vision_layer=-1), image_size=(SIZE, SIZE), rngs=nnx.Rngs(1)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(7)
  values = jax.tree.map(lambda s: rng.normal(scale=0.3, size=s.shape).astype(s.dtype),
                        nnx.to_pure_dict(state))
  values["tower"] = nnx.to_pure_dict(nnx.state(tower))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def test_tiny_vlm_forward_with_a_convnext_tower(hf_dir):
  path, _ = hf_dir("model")
  tower = zoo.load(str(path)).model
  model = _tiny_vlm(tower)
  _grouped_conv(model.tower)
  # The last stage is 2 x 2 at 64 px: four image tokens of 32 channels.
  assert (model.num_image_tokens, model.vision_dim) == (4, 32)
  pixels = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
  assert jax.eval_shape(lambda p: vlm.image_features(model.tower, p, model.config),
                        pixels).shape == (BATCH, 4, 32)
  x = _pixels()
  seq = 9
  ids = jnp.asarray(np.random.default_rng(6).integers(0, 40, (BATCH, seq)))
  mask = jnp.ones((BATCH, seq), jnp.int32)
  image_mask = jnp.zeros((BATCH, seq), bool).at[:, 1:5].set(True)
  run = nnx.jit(lambda m, pixels: m(pixels, ids, mask, image_mask))
  logits = run(model, jnp.asarray(_nhwc(x)))
  assert logits.shape == (BATCH, seq, 40) and bool(jnp.all(jnp.isfinite(logits)))
  # The image reaches the logits: another image changes the positions after it.
  other = run(model, jnp.asarray(_nhwc(x))[::-1])
  assert float(jnp.abs(other - logits)[:, 5:].max()) > 1e-4


def test_convnext_config_round_trips_and_reads_hub_config_defaults():
  hub_config = {"model_type": "convnext", "architectures": ["ConvNextForImageClassification"],
                "hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3]}
  config = convnext.ConvNextConfig.from_hf(hub_config)
  assert (config.final_norm_eps, config.norm_eps, config.image_size, config.kernel_sizes) == (
      1e-12, 1e-6, 224, (7, 7, 7, 7))
  assert convnext.ConvNextConfig.from_hf(config.to_dict()) == config
  oc = convnext.ConvNextConfig.from_open_clip(
      {"embed_dim": 768, "vision_cfg": {"timm_model_name": "convnext_large", "timm_pool": "",
                                        "timm_proj": "mlp", "image_size": 320}})
  assert (oc.depths, oc.hidden_sizes, oc.image_size, oc.projection, oc.norm_eps) == (
      (3, 3, 27, 3), (192, 384, 768, 1536), 320, "mlp", 1e-6)
  assert convnext.ConvNextConfig.from_hf(oc.to_dict()) == oc


@pytest.mark.parametrize("name", sorted(convnext.TIMM_CONVNEXTS))
def test_timm_convnext_table_matches_timm(name):
  """Each name's architecture (built on the meta device: shapes, no memory) is the table's."""
  timm = references.import_reference("timm")
  with torch.device("meta"):
    trunk = timm.create_model(name)
  arch = convnext.TIMM_CONVNEXTS[name]
  blocks = [stage.blocks[0] for stage in trunk.stages]
  assert tuple(len(stage.blocks) for stage in trunk.stages) == arch.depths
  assert tuple(b.conv_dw.out_channels for b in blocks) == arch.dims
  assert tuple(b.conv_dw.kernel_size[0] for b in blocks) == arch.kernel_sizes
  assert not any(b.use_conv_mlp for b in blocks)
  assert {m.eps for m in trunk.modules() if isinstance(m, torch.nn.LayerNorm)} == {arch.norm_eps}
  act = blocks[0].mlp.act
  # timm's own GELU / GELUTanh classes, or torch's.
  names = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "SiLU": "silu"}
  name = names[type(act).__name__]
  if getattr(act, "approximate", "none") == "tanh":
    name = "gelu_tanh"
  assert name == arch.act


def test_open_clip_convnext_configs_parse_and_large_d_320_keys_fit():
  """Every ConvNeXt config OpenCLIP ships reads; Mordal's ConvNeXt-L (convnext_large_d_320, an
  MLP head) routes every tower key to a parameter of the right shape, and fills every one."""
  open_clip = _open_clip()
  names = [n for n in open_clip.list_models() if n.startswith("convnext_")]
  assert len(names) >= 10
  for name in names:
    convnext.ConvNextConfig.from_open_clip(open_clip.get_model_config(name), name)
  model_cfg = open_clip.get_model_config("convnext_large_d_320")
  config = convnext.ConvNextConfig.from_open_clip(model_cfg)
  vision = model_cfg["vision_cfg"]
  with torch.device("meta"):
    tower = open_clip.timm_model.TimmModel(
        vision["timm_model_name"], embed_dim=model_cfg["embed_dim"],
        image_size=vision["image_size"], pool=vision["timm_pool"], proj=vision["timm_proj"])
  abstract = nnx.eval_shape(lambda: convnext.ConvNext(config, rngs=nnx.Rngs(0)))
  # pylint: disable=protected-access
  wanted = checkpoint._flatten(nnx.to_pure_dict(nnx.state(abstract)))
  table = convnext.key_table(config)
  filled = set()
  for key, tensor in tower.state_dict().items():
    routed = checkpoint._route(table, "visual." + key)
    assert routed is not None and routed[0] is not None, key
    target, transform = routed
    path = tuple(int(p) if p.isdigit() else p for p in target.split("."))
    shape = transforms.apply(transform, np.empty(tuple(tensor.shape), np.float32)).shape
    assert wanted[path].shape == shape, (key, shape, wanted[path].shape)
    filled.add(path)
  assert filled == set(wanted)
