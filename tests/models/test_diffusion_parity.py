"""Parity of the NNX diffusion towers (``models.diffusion``) with diffusers' torch modules.

Tiny random configs of diffusers' ``AutoencoderKL``, ``UNet2DConditionModel`` (SD 1.5-, SD 2.1-
and SDXL-style) and ``DiTTransformer2DModel`` get random weights (norms and biases included, so
a swapped or missing one shows), are saved with ``save_pretrained`` into a pipeline-like
directory (``model_index.json``, ``vae/``, ``unet/`` or ``transformer/``, ``scheduler/``) and
loaded back with our loader. Compared: the VAE latent mean, every UNet up block's output
(forward hooks on ``up_blocks[i]``), every DiT block's tokens, and the whole tower (latent →
DDPM ``add_noise`` with the tower's own noise → one denoiser pass). Torch is NCHW, ours NHWC.

Tolerance: every tensor within 1e-4 of the reference's largest magnitude (max |ours - ref| <=
1e-4 * max |ref|), in float32.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import diffusers
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from huggingface_hub import constants as hf_constants

import diffusion_parity_util as util
from vlmsel_jax import zoo
from vlmsel_jax.features import patch_grid as patch_grid_lib
from vlmsel_jax.models import CheckpointError, UnsupportedModelError
from vlmsel_jax.models import diffusion
from vlmsel_jax.models.vlm import modeling as vlm
from vlmsel_jax.zoo import hub

import hub_fixtures


BATCH = util.BATCH
TIMESTEP = 261

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                  layers_per_block=1, norm_num_groups=32, sample_size=16)
# SD 1.5: ``attention_head_dim`` (read as the head count) and 1x1-conv projections; the first
# block cross-attends, the second does not.
SD15_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                   layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=2, norm_num_groups=32)
# SD 2.1: per-block head counts, linear projections.
SD21_CONFIG = dict(SD15_CONFIG, attention_head_dim=(2, 4), use_linear_projection=True,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
# SDXL: no attention in the first block, two transformer layers in the second, the text_time
# added embedding (pooled text 32 + 6 sizes x 8).
SDXL_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                   layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                   use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                   norm_num_groups=32)
DIT_CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear")


def _save_pipeline(root: Path, vae, denoiser, denoiser_name: str) -> Path:
  """A pipeline-like directory: model_index.json, vae/, unet/ or transformer/, scheduler/."""
  vae.save_pretrained(root / "vae")
  denoiser.save_pretrained(root / denoiser_name)
  diffusers.DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
  index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
           denoiser_name: ["diffusers", type(denoiser).__name__],
           "scheduler": ["diffusers", "DDPMScheduler"]}
  (root / "model_index.json").write_text(json.dumps(index))
  return root


def _up_block_outputs(unet, latents, timestep, context, **kwargs) -> list[np.ndarray]:
  """Every ``up_blocks[i]`` output of a diffusers UNet (forward hooks), NHWC."""
  outputs = []
  hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(util.nhwc(out)))
           for block in unet.up_blocks]
  try:
    with torch.no_grad():
      unet(latents, timestep, encoder_hidden_states=context, **kwargs)
  finally:
    for h in hooks:
      h.remove()
  return outputs


# Jitted once per module so that models of one structure compile once (eager JAX compiles every
# operation on its own, which is slower than the whole graph).
_moments = nnx.jit(lambda vae, images: vae.moments(images))
_unet = nnx.jit(lambda unet, *args, **kwargs: unet(*args, **kwargs).hidden_states)
_dit = nnx.jit(lambda dit, latents, t: dit(latents, t).hidden_states)
_tower = nnx.jit(lambda tower, images: tower(images))


@pytest.fixture(scope="module")
def torch_vae():
  return util.randomise(diffusers.AutoencoderKL(**VAE_CONFIG), seed=0)


def test_vae_latent_mean_matches_diffusers(torch_vae, tmp_path):
  torch_vae.save_pretrained(tmp_path / "vae")
  ours = diffusion.load_vae(tmp_path / "vae")
  images = util.images(16)
  with torch.no_grad():
    ref = torch_vae.encode(util.nchw(images)).latent_dist
  mean, logvar = _moments(ours, images)
  util.assert_close(mean, util.nhwc(ref.mean), "latent mean")
  util.assert_close(logvar, util.nhwc(ref.logvar), "latent logvar")
  # The VAE config leaves scaling_factor at diffusers' default, SD 1.x's 0.18215.
  np.testing.assert_allclose(np.asarray(ours.config.scaling_factor), 0.18215)


def test_vae_reads_legacy_attention_names(torch_vae, tmp_path):
  """Older SD 1.x VAEs name the mid-block attention query / key / value / proj_attn."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  torch_vae.save_pretrained(tmp_path / "vae")
  weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
             ".to_out.0.": ".proj_attn."}
  tensors = {}
  for key, value in load_file(weights).items():
    if "encoder.mid_block.attentions" in key:
      for old, new in renames.items():
        key = key.replace(old, new)
    tensors[key] = value
  save_file(tensors, weights)
  images = util.images(16)
  with torch.no_grad():
    ref = util.nhwc(torch_vae.encode(util.nchw(images)).latent_dist.mean)
  util.assert_close(_moments(diffusion.load_vae(tmp_path / "vae"), images)[0], ref, "latent mean")


@pytest.mark.parametrize("config", [SD21_CONFIG], ids=["sd21"])
def test_unet_up_blocks_match_diffusers(config, tmp_path):
  """Random latents and a random 5-token text conditioning (SDXL: random pooled text and size
  numbers), every up block's output. SD 1.5- and SDXL-style UNets are compared inside the whole
  tower (``test_tower_matches_diffusers_pipeline``), with random conditioning too."""
  unet = util.randomise(diffusers.UNet2DConditionModel(**config), seed=2)
  unet.save_pretrained(tmp_path / "unet")
  ours = diffusion.load_unet(tmp_path / "unet")
  rng = np.random.RandomState(3)
  latents = rng.randn(BATCH, 8, 8, 4).astype(np.float32)
  context = rng.randn(BATCH, 5, 32).astype(np.float32)
  kwargs, our_kwargs = {}, {}
  if config.get("addition_embed_type") == "text_time":
    pooled = rng.randn(BATCH, 32).astype(np.float32)
    time_ids = np.asarray([[64, 48, 3, 5, 64, 64]] * BATCH, np.float32)
    kwargs = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(pooled),
                                    "time_ids": torch.from_numpy(time_ids)}}
    our_kwargs = {"pooled_text": pooled, "time_ids": time_ids}
  ref = _up_block_outputs(unet, util.nchw(latents), TIMESTEP, torch.from_numpy(context), **kwargs)
  out = _unet(ours, latents, np.float32(TIMESTEP), context, **our_kwargs)
  assert len(out) == len(ref) == len(config["block_out_channels"])
  for i, (a, b) in enumerate(zip(out, ref)):
    util.assert_close(a, b, f"up_blocks[{i}]")


def test_unet_rejects_unsupported_config():
  config = dict(diffusers.UNet2DConditionModel(**SD15_CONFIG).config,
                class_embed_type="timestep", mid_block_type="UNetMidBlock2DSimpleCrossAttn")
  with pytest.raises(UnsupportedModelError, match="class_embed_type.*mid_block_type"):
    diffusion.UNetConfig.from_diffusers(config)


def test_unet_key_table_reports_missing_and_unexpected(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  unet = util.randomise(diffusers.UNet2DConditionModel(**SD15_CONFIG), seed=2)
  unet.save_pretrained(tmp_path / "unet")
  weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
  tensors = load_file(weights)
  del tensors["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
  tensors["up_blocks.1.mystery.weight"] = np.zeros(3, np.float32)
  save_file(tensors, weights)
  with pytest.raises(CheckpointError) as info:
    diffusion.load_unet(tmp_path / "unet")
  message = str(info.value)
  assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.kernel" in message
  assert "up_blocks.1.mystery.weight" in message


def _reference_unet_tower(vae, unet, pipeline_dir: Path, images, tower, context,
                          pooled) -> tuple:
  """The tower's computation done with diffusers: latent mean x scaling factor, DDPM
  ``add_noise`` with the tower's noise, the UNet's up blocks with the given conditioning (SDXL:
  the pooled text and (H, W, 0, 0, H, W))."""
  scheduler = diffusers.DDPMScheduler.from_pretrained(pipeline_dir / "scheduler")
  with torch.no_grad():
    latents = vae.encode(util.nchw(images)).latent_dist.mean * vae.config.scaling_factor
  b, c, h, w = latents.shape
  noise = util.nchw(np.broadcast_to(np.asarray(tower.noise((h, w, c))), (b, h, w, c)))
  timesteps = torch.full((b,), tower.timestep, dtype=torch.long)
  noisy = scheduler.add_noise(latents, noise, timesteps)
  kwargs = {}
  if unet.config.addition_embed_type == "text_time":
    size = images.shape[1]
    kwargs = {"added_cond_kwargs": {
        "text_embeds": torch.from_numpy(pooled).reshape(1, -1).expand(b, -1),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * b, dtype=torch.float32)}}
  context = torch.from_numpy(context)[None].expand(b, -1, -1)
  outputs = _up_block_outputs(unet, noisy, timesteps, context, **kwargs)
  return util.nhwc(latents), outputs


@pytest.mark.parametrize("config,size", [(SD15_CONFIG, 14), (SDXL_CONFIG, 16)],
                         ids=["sd15_odd", "sdxl"])
def test_tower_matches_diffusers_pipeline(config, size, torch_vae, tmp_path):
  """The whole tower, with the empty prompt's embeddings saved next to the pipeline (random
  here, so that cross-attention matters; SDXL also its pooled embedding). SD 1.5 at 14 px: a
  7 x 7 latent, whose up path upsamples to the skips' size rather than by 2."""
  unet = util.randomise(diffusers.UNet2DConditionModel(**config), seed=4)
  root = _save_pipeline(tmp_path / "pipe", torch_vae, unet, "unet")
  rng = np.random.RandomState(10)
  context = rng.randn(3, 32).astype(np.float32)
  pooled = rng.randn(32).astype(np.float32)
  np.save(root / diffusion.EMPTY_PROMPT_EMBEDS, context)
  if config is SDXL_CONFIG:
    np.save(root / diffusion.EMPTY_PROMPT_POOLED_EMBEDS, pooled)
  tower, info = diffusion.load_tower(root)
  assert info.image_size == 16 and info.denoiser == "unet" and tower.timestep == 261
  np.testing.assert_array_equal(np.asarray(tower.context[...]), context[None])
  images = util.images(size, seed=5)
  ref_latents, ref = _reference_unet_tower(torch_vae, unet, root, images, tower, context, pooled)
  out = _tower(tower, images)
  util.assert_close(out.latents, ref_latents, "latents")
  assert len(out.hidden_states) == len(ref) == 2
  for i, (a, b) in enumerate(zip(out.hidden_states, ref)):
    util.assert_close(a, b, f"hidden_states[{i}]")
  # The noise is fixed per image, not drawn per batch: reordering the batch reorders features.
  swapped = _tower(tower, images[::-1])
  np.testing.assert_allclose(swapped.hidden_states[1], np.asarray(out.hidden_states[1])[::-1],
                             rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="outside the schedule"):
    tower.with_timestep(1000)
  other = tower.with_timestep(10)
  assert other.timestep == 10 and other.denoiser is tower.denoiser
  np.testing.assert_array_equal(np.asarray(other.context[...]), context[None])


def _dit_block_outputs(dit, latents, timesteps, labels) -> list[np.ndarray]:
  """Every ``transformer_blocks[i]`` output of a diffusers DiT (tokens), as patch grids."""
  outputs = []
  hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().numpy()))
           for block in dit.transformer_blocks]
  try:
    with torch.no_grad():
      dit(latents, timestep=timesteps, class_labels=labels)
  finally:
    for h in hooks:
      h.remove()
  b, _, h, w = latents.shape
  p = dit.config.patch_size
  return [o.reshape(b, h // p, w // p, -1) for o in outputs]


@pytest.fixture(scope="module")
def torch_dit():
  return util.randomise(diffusers.DiTTransformer2DModel(**DIT_CONFIG), seed=6)


def test_dit_blocks_match_diffusers(torch_dit, tmp_path):
  """Every block's tokens, null class; at the training size and at a larger, non-square latent
  (position embeddings recomputed for the grid)."""
  torch_dit.save_pretrained(tmp_path / "transformer")
  ours = diffusion.load_dit(tmp_path / "transformer")
  rng = np.random.RandomState(7)
  latents = rng.randn(BATCH, 8, 12, 4).astype(np.float32)
  timesteps = np.asarray([TIMESTEP, 20], np.float32)
  null = torch.full((BATCH,), DIT_CONFIG["num_embeds_ada_norm"], dtype=torch.long)
  ref = _dit_block_outputs(torch_dit, util.nchw(latents), torch.from_numpy(timesteps).long(), null)
  out = _dit(ours, latents, timesteps)
  assert len(out) == len(ref) == DIT_CONFIG["num_layers"]
  for i, (a, b) in enumerate(zip(out, ref)):
    util.assert_close(a, b, f"transformer_blocks[{i}]")


def test_zoo_loads_dit_pipeline_as_vision_tower(torch_vae, torch_dit, tmp_path):
  """``zoo.load(<pipeline dir>)``: a vision model whose extraction features and patch grid are
  the tower's computation done with diffusers; variants set the layer, timestep and size."""
  root = _save_pipeline(tmp_path / "dit-pipe", torch_vae, torch_dit, "transformer")
  loaded = zoo.load(str(root))
  assert loaded.kind == "vision" and loaded.name == "dit-pipe"
  assert loaded.num_layers == 2 and loaded.default_layer == loaded.model.GRID_DEFAULT_LAYER == 1
  assert loaded.preprocessing.image_size == (16, 16)
  images = util.images(16, seed=8)
  scheduler = diffusers.DDPMScheduler.from_pretrained(root / "scheduler")
  with torch.no_grad():
    latents = torch_vae.encode(util.nchw(images)).latent_dist.mean * torch_vae.config.scaling_factor
  b, c, h, w = latents.shape
  noise = util.nchw(np.broadcast_to(np.asarray(loaded.model.noise((h, w, c))), (b, h, w, c)))
  timesteps = torch.full((b,), diffusion.DEFAULT_TIMESTEP, dtype=torch.long)
  null = torch.full((b,), DIT_CONFIG["num_embeds_ada_norm"], dtype=torch.long)
  ref = _dit_block_outputs(torch_dit, scheduler.add_noise(latents, noise, timesteps), timesteps,
                           null)[1]
  grid = patch_grid_lib.patch_grid_fn(loaded)(images)
  util.assert_close(grid, ref, "patch grid")
  features = jax.jit(lambda x: loaded.features(loaded.model, {"pixels": x}, 1, "mean"))(images)
  util.assert_close(features, ref.mean(axis=(1, 2)), "extraction features")
  # A VLM reads the same grid as image tokens (shapes only: no compilation).
  tokens = jax.eval_shape(lambda x: vlm.image_features(loaded.model, x, vlm.VLMConfig(
      vision_layer=loaded.default_layer)), jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32))
  assert tokens.shape == (1, 16, 32)

  # Variants, applied to the tower already loaded (the loader is what reading files costs).
  def with_variant(spec):
    return dataclasses.replace(zoo.resolve(spec), loader=lambda _path, name, _dtype:
                               dataclasses.replace(loaded, name=name)).load()

  variant = with_variant(f"{root}@layer=0,res=32,t=100")
  assert variant.name == "dit-pipe@layer=0,res=32,t=100"
  assert variant.default_layer == 0 and variant.model.timestep == 100
  assert variant.model.denoiser is loaded.model.denoiser
  assert variant.preprocessing.image_size == (32, 32)
  with pytest.raises(zoo.ZooError, match="timestep 1000"):
    with_variant(f"{root}@t=1000")
  fingerprint = zoo.resolve(f"{root}@t=100").fingerprint()
  assert fingerprint["variant"] == {"layer": None, "res": None, "t": 100}
  assert "transformer/diffusion_pytorch_model.safetensors" in [f[0] for f in fingerprint["files"]]


def test_a_hub_pipeline_resolves_and_loads_offline(torch_vae, torch_dit, tmp_path, monkeypatch):
  """A diffusers pipeline named by its Hub id: ``model_index.json`` marks it, the snapshot holds
  the components the tower reads, and it loads the same weights as the directory; a snapshot
  without its denoiser's weights is one line saying how to fetch it."""
  root = _save_pipeline(tmp_path / "dit-pipe", torch_vae, torch_dit, "transformer")
  assert any(p.startswith("transformer/") for p in hub.DIFFUSERS_PATTERNS)
  hub_fixtures.add_snapshot(tmp_path / "hub", "vlmsel-test/dit-tiny", root)
  (root / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
  hub_fixtures.add_snapshot(tmp_path / "hub", "vlmsel-test/dit-no-weights", root)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  resolved = zoo.resolve("vlmsel-test/dit-tiny@t=100")
  assert resolved.kind == "vision" and resolved.hub is not None
  loaded = resolved.load()
  assert loaded.model.timestep == 100 and loaded.num_layers == 2
  reference = diffusion.load_dit(tmp_path / "hub" / "models--vlmsel-test--dit-tiny" / "snapshots"
                                 / resolved.hub.commit / "transformer")
  ours = jax.tree_util.tree_leaves(nnx.state(loaded.model.denoiser))
  theirs = jax.tree_util.tree_leaves(nnx.state(reference))
  assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
  with pytest.raises(zoo.ZooError, match="lacks the safetensors weights.*hf download"):
    zoo.resolve("vlmsel-test/dit-no-weights")
