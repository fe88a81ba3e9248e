"""Parity of the NNX Qwen2.5-VL vision tower with transformers' torch
``Qwen2_5_VisionTransformerPretrainedModel``.

A tiny random ``Qwen2_5_VLForConditionalGeneration`` (3 blocks, block 1 attending globally, the
others in windows of 4 x 4 patches; a one-layer language model) is saved with ``save_pretrained``
and loaded through ``load_pretrained`` and ``zoo.load``. transformers runs on the processor's own
patch layout (``Qwen2VLImageProcessorPil`` on images already at their size); its block outputs,
which come in window order, are put back in row-major order with transformers' window index, and
compared with every hidden state (embeddings, each block, the merger's output) here.

Tolerance: float32, max abs error <= 1e-4 * max(1, max |reference|) (``REL_TOL``).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import huggingface_hub
import transformers
from flax import nnx
from huggingface_hub import constants as hf_constants
from safetensors.numpy import save_file
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
from transformers import vision_utils

import hub_fixtures

from vlmsel_jax import zoo
from vlmsel_jax.features import patch_grid as patch_grid_lib
from vlmsel_jax.models import CheckpointError, CheckpointFileError, HFDirectory, load_pretrained
from vlmsel_jax.models import qwen2_5_vl
from vlmsel_jax.models.llama import modeling as llama
from vlmsel_jax.models.qwen2_5_vl import Qwen25VisionConfig, Qwen25VisionTower
from vlmsel_jax.models.vlm import modeling as vlm
from vlmsel_jax.zoo import hub
from vlmsel_jax.zoo import preprocessing as zoo_preprocessing

REL_TOL = 1e-4
BATCH = 2
PATCH = 4
MERGE = 2
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=24,
              patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
              window_size=16, fullatt_block_indexes=[1])
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64)
PROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": PATCH,
             "merge_size": MERGE, "temporal_patch_size": 2, "min_pixels": 3136,
             "max_pixels": 12845056, "resample": 3,
             "image_mean": list(zoo_preprocessing.CLIP_MEAN),
             "image_std": list(zoo_preprocessing.CLIP_STD)}


def _tol(ref: np.ndarray) -> float:
  return REL_TOL * max(1.0, float(np.abs(ref).max()))


def _pixels(height, width, seed=1):
  return np.random.RandomState(seed).randn(BATCH, 3, height, width).astype(np.float32)


@functools.cache
def _torch_model() -> transformers.Qwen2_5_VLForConditionalGeneration:
  """Every vision parameter random: norm scales 1 + noise, everything else noise, so a swapped
  norm, a missing bias or an unused tensor changes the output."""
  config = transformers.Qwen2_5_VLConfig(vision_config=VISION, text_config=TEXT)
  model = transformers.Qwen2_5_VLForConditionalGeneration(config)
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.model.visual.named_parameters():
      is_scale = name.endswith("weight") and ("norm" in name or "ln_q" in name)
      p.copy_(torch.randn_like(p) * (0.2 if is_scale else 0.1) + (1.0 if is_scale else 0.0))
  return model.eval()


@functools.cache
def _torch_outputs(height: int, width: int) -> dict[str, list[np.ndarray] | np.ndarray]:
  """transformers' hidden states of ``_pixels(height, width)`` in row-major order, per image:
  ``hidden_states`` (embeddings, then each block: (batch, patches, hidden)) and ``merged``
  (the merger's output, transformers' pooler_output: (batch, merged tokens, out))."""
  visual = _torch_model().model.visual
  x = _pixels(height, width)
  processor = image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
      patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
  inputs = processor(images=list(x), do_resize=False, do_rescale=False, do_normalize=False,
                     return_tensors="pt")
  grid_thw = inputs["image_grid_thw"]
  with torch.no_grad():
    out = visual(inputs["pixel_values"], grid_thw=grid_thw, output_hidden_states=True)
  window_index, _ = vision_utils.get_vision_window_index(grid_thw, MERGE, VISION["window_size"],
                                                         PATCH)
  to_units = torch.argsort(window_index)
  rows, cols = height // PATCH, width // PATCH

  def row_major(h):
    # Window order -> merge-unit order (the processor's) -> row-major patches.
    h = h.reshape(-1, MERGE * MERGE, h.shape[-1])[to_units]
    h = h.reshape(BATCH, rows // MERGE, cols // MERGE, MERGE, MERGE, -1)
    return h.permute(0, 1, 3, 2, 4, 5).reshape(BATCH, rows * cols, -1).numpy()

  return {"hidden_states": [row_major(h) for h in out.hidden_states],
          "merged": out.pooler_output.reshape(BATCH, -1, VISION["out_hidden_size"]).numpy()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """The saved tiny Qwen2.5-VL directory (with its processor's settings); never modified."""
  path = tmp_path_factory.mktemp("qwen2_5_vl")
  _torch_model().save_pretrained(path)
  with open(path / "preprocessor_config.json", "w", encoding="utf-8") as f:
    json.dump(PROCESSOR, f)
  return path


_forward = nnx.jit(lambda model, x: model(x))


def _assert_matches(ours, ref):
  assert len(ours.hidden_states) == len(ref["hidden_states"]) + 1 == VISION["depth"] + 2
  for i, r in enumerate(ref["hidden_states"] + [ref["merged"]]):
    np.testing.assert_allclose(np.asarray(ours.hidden_states[i]), r, atol=_tol(r), rtol=0,
                               err_msg=f"hidden_states[{i}]")


@pytest.mark.parametrize("size", [(24, 40), (32, 32)])
def test_hidden_states_match_transformers(checkpoint, size):
  """24 x 40 px: a 6 x 10 patch grid in 2 x 3 windows of 4 x 4 patches, cut by the bottom and
  right borders; 32 x 32 px: 2 x 2 whole windows. Blocks 0 and 2 are windowed, block 1 global."""
  model = load_pretrained(checkpoint)
  assert isinstance(model, Qwen25VisionTower)
  assert [b.attn.windowed for b in model.blocks] == [True, False, True]
  out = _forward(model, _pixels(*size).transpose(0, 2, 3, 1))
  assert out.grid == (size[0] // PATCH, size[1] // PATCH)
  _assert_matches(out, _torch_outputs(*size))


def test_in_memory_key_names_load_and_language_model_is_not_read(checkpoint, tmp_path):
  """``model.visual.*`` / ``model.language_model.*`` names load alike; the language model's
  tensors are never read, and a stray key is still an error."""
  src = HFDirectory(checkpoint)
  tensors = {}
  for key, value in src:
    key = "model." + key if key.startswith("visual.") else key
    tensors[key.replace("model.layers.", "model.language_model.layers.")] = value
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(src.config))
  out = _forward(load_pretrained(tmp_path), _pixels(24, 40).transpose(0, 2, 3, 1))
  _assert_matches(out, _torch_outputs(24, 40))

  reads = qwen2_5_vl.reads_key(Qwen25VisionConfig.from_hf(src.config))
  read = [key for key, _ in HFDirectory(tmp_path).select(reads)]
  assert read and all(key.startswith("model.visual.") for key in read)
  assert len(read) < len(tensors)

  save_file({**tensors, "model.visual.extra.weight": np.zeros(2, np.float32)},
            str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="model.visual.extra.weight"):
    load_pretrained(tmp_path)


def test_bfloat16_load_runs_close_to_float32(checkpoint):
  x = _pixels(32, 32).transpose(0, 2, 3, 1)
  ref = _torch_outputs(32, 32)["merged"]
  out = _forward(load_pretrained(checkpoint, dtype="bfloat16"), x)
  merged = np.asarray(out.merged.astype(jnp.float32))
  assert out.merged.dtype == jnp.bfloat16
  assert np.abs(merged - ref).max() <= 0.05 * np.abs(ref).max()


def test_config_from_hub_style_and_errors(checkpoint):
  config = Qwen25VisionConfig.from_hf(checkpoint)
  assert (config.num_layers, config.window_patches, config.input_multiple,
          config.fullatt_block_indexes) == (3, 4, 8, (1,))
  # A Hub config written before transformers 5: in_chans, the VLM's model_type inside, defaults.
  hub = {"model_type": "qwen2_5_vl", "vision_config": {
      "model_type": "qwen2_5_vl", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "window_size": 112}}
  config = Qwen25VisionConfig.from_hf(hub)
  assert (config.num_channels, config.patch_size, config.window_patches, config.rope_theta,
          config.fullatt_block_indexes) == (3, 14, 8, 10000.0, (7, 15, 23, 31))
  with pytest.raises(ValueError, match="not a Qwen2.5-VL"):
    Qwen25VisionConfig.from_hf({"model_type": "qwen2_vl"})
  with pytest.raises(ValueError, match="window_size"):
    Qwen25VisionConfig.from_hf({"model_type": "qwen2_5_vl",
                                "vision_config": dict(VISION, window_size=20)})
  with pytest.raises(ValueError, match="multiple of 8"):
    load_pretrained(checkpoint)(jnp.zeros((1, 28, 32, 3)))


def test_zoo_load_features_patch_grid_and_variants(checkpoint):
  assert zoo.resolve(str(checkpoint)).kind == "vision"
  loaded = zoo.load(str(checkpoint))
  assert loaded.poolings == ("mean",) and loaded.num_layers == VISION["depth"] + 2
  assert loaded.default_layer == -1 and patch_grid_lib.default_layer(loaded) == -1
  prep = loaded.preprocessing
  # 16 x 16 merged tokens: 128 px for patch 4 x merge 2 (448 px for Qwen2.5-VL's 14 x 2).
  assert prep.image_size == (128, 128) and prep.mean == zoo_preprocessing.CLIP_MEAN
  assert jax.eval_shape(patch_grid_lib.patch_grid_fn(loaded),
                        jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)).shape == (1, 16, 16, 24)

  at_32 = zoo.load(f"{checkpoint}@res=32")
  assert at_32.preprocessing.image_size == (32, 32)
  ref = _torch_outputs(32, 32)
  pixels = jnp.asarray(_pixels(32, 32).transpose(0, 2, 3, 1))
  # The C score's grid at the default layer: the merged tokens, row-major on the 4 x 4 grid.
  grid = patch_grid_lib.patch_grid_fn(at_32)(pixels)
  np.testing.assert_allclose(np.asarray(grid), ref["merged"].reshape(BATCH, 4, 4, 24),
                             atol=_tol(ref["merged"]), rtol=0)
  # A bank's features: the mean of the last block's patch tokens.
  features = nnx.jit(at_32.features, static_argnums=(2, 3))
  mean = features(at_32.model, {"pixels": pixels}, -2, "mean")
  np.testing.assert_allclose(np.asarray(mean), ref["hidden_states"][-1].mean(1),
                             atol=_tol(ref["hidden_states"][-1]), rtol=0)
  assert patch_grid_lib.patch_grid(at_32, pixels, 0).shape == (BATCH, 8, 8, 32)

  assert zoo.load(f"{checkpoint}@layer=-3").default_layer == -3
  with pytest.raises(zoo.ZooError, match="multiple of 8"):
    zoo.load(f"{checkpoint}@res=36")


def test_hub_id_resolves_and_loads(checkpoint, tmp_path, monkeypatch):
  hub_fixtures.add_snapshot(tmp_path / "hub", "vlmsel-test/qwen2_5_vl-tiny", checkpoint)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  resolved = zoo.resolve("vlmsel-test/qwen2_5_vl-tiny@layer=-2,res=64")
  assert resolved.kind == "vision" and resolved.hub is not None
  loaded = resolved.load()
  assert isinstance(loaded.model, Qwen25VisionTower) and loaded.default_layer == -2
  assert loaded.preprocessing.image_size == (64, 64)


def test_tower_in_a_vlm_with_fused_attention_and_remat(checkpoint):
  """The VLM reads the merged tokens through ``patch_grid`` with the fused attention path (the
  window padding mask included) and remat set on the tower by the VLM."""
  llm = llama.Llama(llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8),
                    rngs=nnx.Rngs(3))
  model = vlm.VLM(load_pretrained(checkpoint), llm,
                  vlm.VLMConfig(vision_layer=-1, attention_impl="fused", remat=True),
                  image_size=(24, 40), rngs=nnx.Rngs(1))
  assert model.num_image_tokens == 15 and model.vision_dim == 24
  assert model.tower.config.remat is True
  assert all(b.attn.attention_impl == "fused" for b in model.tower.blocks)
  pixels = jnp.asarray(_pixels(24, 40).transpose(0, 2, 3, 1))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (BATCH, 20)))
  mask = jnp.ones((BATCH, 20), jnp.int32)
  image_mask = jnp.zeros((BATCH, 20), bool).at[:, 2:17].set(True)  # 3 x 5 merged tokens

  @nnx.jit
  def run(model):
    return (vlm.image_features(model.tower, pixels, model.config),
            model(pixels, ids, mask, image_mask))

  feats, logits = run(model)
  ref = _torch_outputs(24, 40)["merged"]
  np.testing.assert_allclose(np.asarray(feats), ref, atol=_tol(ref), rtol=0)
  assert logits.shape == (BATCH, 20, 40) and bool(jnp.isfinite(logits).all())


def _split_shards(checkpoint, root):
  """The checkpoint re-saved in two shards, as large Hub repos are: the tower in one, the
  language model in the other, and the index naming both."""
  src = HFDirectory(checkpoint)
  tensors = dict(src)
  tower = {k: v for k, v in tensors.items() if "visual." in k}
  shards = {"model-00001-of-00002.safetensors": tower,
            "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items()
                                                 if k not in tower}}
  root.mkdir()
  for name, part in shards.items():
    save_file(part, str(root / name))
  (root / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}))
  (root / "config.json").write_text(json.dumps(src.config))
  return root


def test_only_the_towers_shards_are_read_or_fetched(checkpoint, tmp_path, monkeypatch):
  """A sharded Qwen2.5-VL loads from its tower's shards alone, and a Hub id fetches only those
  (what ``snapshot_download`` is asked for is recorded; it serves files from a full repo)."""
  full = _split_shards(checkpoint, tmp_path / "full")
  assert [f.name for f in HFDirectory(full).shards_for(
      qwen2_5_vl.reads_key(None))] == ["model-00001-of-00002.safetensors"]
  partial = tmp_path / "partial"
  shutil.copytree(full, partial)
  (partial / "model-00002-of-00002.safetensors").unlink()
  want = _forward(load_pretrained(checkpoint), _pixels(24, 40).transpose(0, 2, 3, 1))
  got = _forward(load_pretrained(partial), _pixels(24, 40).transpose(0, 2, 3, 1))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(CheckpointFileError, match="model-00002-of-00002.safetensors: shard listed"):
    list(HFDirectory(partial))  # Reading everything still needs every shard.

  asked = []

  def snapshot_download(repo_id, revision, local_files_only, allow_patterns):
    del repo_id, revision, local_files_only
    asked.append(sorted(allow_patterns))
    snap = tmp_path / "snapshot"
    for f in full.iterdir():
      if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
        snap.mkdir(exist_ok=True)
        shutil.copy(f, snap / f.name)
    return str(snap)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
  path = hub.snapshot("vlmsel-test/qwen2_5_vl-sharded").path
  weights = [p for patterns in asked for p in patterns if p.endswith(".safetensors")]
  assert weights == ["model-00001-of-00002.safetensors"], asked
  assert sorted(f.name for f in path.glob("*.safetensors")) == [
      "model-00001-of-00002.safetensors"]
  out = _forward(load_pretrained(path), _pixels(24, 40).transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(np.asarray(out.hidden_states[-1]),
                                np.asarray(want.hidden_states[-1]))
