"""Parity of the Stable Diffusion 3 tower (``models.diffusion.mmdit``) with diffusers (torch).

Tiny random configs of diffusers' ``SD3Transformer2DModel`` (SD 3-style; SD 3.5-style with
``qk_norm="rms_norm"`` and a dual-attention block; one without ``pos_embed_max_size``) and of a
16-channel ``AutoencoderKL`` with a ``shift_factor`` and no quant convs (SD3's VAE) get random
weights (norms and biases included, so a swapped or missing one shows), are saved with
``save_pretrained`` into an SD3 pipeline-like directory (``model_index.json``, ``vae/``,
``transformer/``, ``scheduler/`` with ``FlowMatchEulerDiscreteScheduler(shift=3.0)``) and loaded
back with our loader. Compared: every joint block's image tokens (forward hooks on
``transformer_blocks[i]``), the flow-matching sigmas and model timesteps, and the whole tower
(latent ``(mean - shift_factor) * scaling_factor`` → ``scale_noise`` with the tower's own noise
→ one transformer pass), directly and through the zoo. Torch is NCHW, ours NHWC.

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

import diffusion_parity_util as util
from vlmsel_jax import zoo
from vlmsel_jax.features import patch_grid as patch_grid_lib
from vlmsel_jax.models import UnsupportedModelError
from vlmsel_jax.models import attention as attention_lib
from vlmsel_jax.models import diffusion

BATCH = util.BATCH
IMAGE_SIZE = 16

# SD3's VAE: 16 latent channels, shifted and scaled, no quant_conv / post_quant_conv.
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
                  layers_per_block=1, norm_num_groups=32, sample_size=IMAGE_SIZE,
                  scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                  use_post_quant_conv=False)
# SD 3: an 8 x 8 latent (a 4 x 4 patch grid) centre-cropped out of a 6 x 6 position table; the
# last block is context_pre_only.
SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                  caption_projection_dim=16, pooled_projection_dim=12, out_channels=16,
                  pos_embed_max_size=6)
# SD 3.5 (Medium): RMSNorm on queries and keys, the second attention in block 0.
SD35_CONFIG = dict(SD3_CONFIG, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,))
# No stored position table: the sin-cos table is computed for the grid.
NO_TABLE_CONFIG = dict(SD3_CONFIG, pos_embed_max_size=None)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


def _block_outputs(transformer, latents, timesteps, context, pooled) -> list[np.ndarray]:
  """Every ``transformer_blocks[i]`` image-stream output of diffusers' SD3 transformer, as
  (batch, rows, cols, hidden) patch grids."""
  outputs = []
  hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out[1].numpy()))
           for block in transformer.transformer_blocks]
  try:
    with torch.no_grad():
      transformer(latents, encoder_hidden_states=context, pooled_projections=pooled,
                  timestep=timesteps)
  finally:
    for h in hooks:
      h.remove()
  b, _, h, w = latents.shape
  p = transformer.config.patch_size
  return [o.reshape(b, h // p, w // p, -1) for o in outputs]


# Jitted once per module so that models of one structure compile once.
_mmdit = nnx.jit(lambda model, *args: model(*args).hidden_states)
_tower = nnx.jit(lambda tower, images: tower(images))


@pytest.mark.parametrize("config,latent_hw", [(SD3_CONFIG, (8, 10)), (SD35_CONFIG, (6, 12)),
                                              (NO_TABLE_CONFIG, (8, 12))],
                         ids=["sd3", "sd35_qk_norm_dual_attention", "computed_positions"])
def test_mmdit_blocks_match_diffusers(config, latent_hw, tmp_path):
  """Random latents, 5 random text tokens and pooled embeddings, two timesteps; non-square
  latents (the position table cropped off-centre by a row, or computed for the grid)."""
  transformer = util.randomise(diffusers.SD3Transformer2DModel(**config), seed=2)
  transformer.save_pretrained(tmp_path / "transformer")
  ours = diffusion.load_mmdit(tmp_path / "transformer")
  rng = np.random.RandomState(3)
  latents = rng.randn(BATCH, *latent_hw, 16).astype(np.float32)
  context = rng.randn(BATCH, 5, 24).astype(np.float32)
  pooled = rng.randn(BATCH, 12).astype(np.float32)
  timesteps = np.asarray([420.86, 31.5], np.float32)
  ref = _block_outputs(transformer, util.nchw(latents), torch.from_numpy(timesteps),
                       torch.from_numpy(context), torch.from_numpy(pooled))
  out = _mmdit(ours, latents, timesteps, context, pooled)
  assert len(out) == len(ref) == config["num_layers"]
  for i, (a, b) in enumerate(zip(out, ref)):
    util.assert_close(a, b, f"transformer_blocks[{i}]")
  if config is not SD35_CONFIG:
    return
  # jax.nn.dot_product_attention in place of the einsum (every attention kind of SD 3.5 here):
  # the same numbers.
  attention_lib.configure(ours, attention_impl="fused")
  assert {a.attention_impl for _, a in nnx.iter_graph(ours)
          if isinstance(a, diffusion.mmdit.JointAttention)} == {"fused"}
  util.assert_close(_mmdit(ours, latents, timesteps, context, pooled)[-1], ref[-1],
                "transformer_blocks[-1], fused attention")


def test_mmdit_refuses_unsupported_config(tmp_path):
  """An unsupported setting is one line naming the config file."""
  transformer = diffusers.SD3Transformer2DModel(**dict(SD3_CONFIG, qk_norm="layer_norm"))
  transformer.save_pretrained(tmp_path / "transformer")
  with pytest.raises(UnsupportedModelError,
                     match=r"transformer/config\.json: .*qk_norm 'layer_norm'") as info:
    diffusion.load_mmdit(tmp_path / "transformer")
  assert "\n" not in str(info.value)


def test_flow_match_schedule_matches_diffusers():
  """Our sigmas are the scheduler's, timestep t at its index N - 1 - t, to the bit; the model is
  told its ``timesteps``; the default is the DIFT-matched noise level; dynamic shifting is
  refused."""
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
  config = dict(scheduler.config, _class_name="FlowMatchEulerDiscreteScheduler")
  schedule = diffusion.NoiseSchedule.read(config)
  assert schedule.kind == "flow_match" and schedule.num_train_timesteps == 1000
  np.testing.assert_array_equal(diffusion.flow_match_sigmas(config),
                                scheduler.sigmas.numpy()[::-1])
  for t in (0, 194, 500, 999):
    sigma = float(scheduler.sigmas[999 - t])
    assert schedule.coefficients(t) == (float(np.float32(1) - np.float32(sigma)), sigma)
    assert schedule.model_timestep(t) == float(scheduler.timesteps[999 - t])
  # sigma ~ 0.42: the signal-to-noise ratio of DIFT's t = 261 under SD's DDPM schedule.
  assert schedule.default_timestep == 194
  assert abs(schedule.coefficients(194)[1] - 0.42) < 2e-3
  with pytest.raises(UnsupportedModelError, match="use_dynamic_shifting"):
    diffusion.NoiseSchedule.read(dict(config, use_dynamic_shifting=True))


@pytest.fixture(scope="module")
def torch_vae():
  return util.randomise(diffusers.AutoencoderKL(**VAE_CONFIG), seed=0)


@pytest.fixture(scope="module")
def torch_transformer():
  return util.randomise(diffusers.SD3Transformer2DModel(**SD35_CONFIG), seed=4)


def _save_sd3_pipeline(root: Path, vae, transformer) -> Path:
  """An SD3 pipeline-like directory: model_index.json, vae/, transformer/, scheduler/."""
  vae.save_pretrained(root / "vae")
  transformer.save_pretrained(root / "transformer")
  diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(
      root / "scheduler")
  index = {"_class_name": "StableDiffusion3Pipeline", "vae": ["diffusers", "AutoencoderKL"],
           "transformer": ["diffusers", "SD3Transformer2DModel"],
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "text_encoder": [None, None]}
  (root / "model_index.json").write_text(json.dumps(index))
  return root


def _reference_tower(vae, transformer, root: Path, images, tower, context, pooled):
  """The tower's computation done with diffusers: (latent mean - shift_factor) x scaling
  factor, ``scale_noise`` at the scheduler's timestep for the tower's t with the tower's noise,
  every joint block with the given (1, tokens, width) / (1, width) conditioning."""
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
  with torch.no_grad():
    mean = vae.encode(util.nchw(images)).latent_dist.mean
  latents = (mean - vae.config.shift_factor) * vae.config.scaling_factor
  b, c, h, w = latents.shape
  noise = util.nchw(np.broadcast_to(np.asarray(tower.noise((h, w, c))), (b, h, w, c)))
  n = scheduler.config.num_train_timesteps
  timesteps = scheduler.timesteps[n - 1 - tower.timestep].repeat(b)
  noisy = scheduler.scale_noise(latents, timesteps, noise)
  outputs = _block_outputs(transformer, noisy, timesteps,
                           torch.from_numpy(context).expand(b, -1, -1),
                           torch.from_numpy(pooled).expand(b, -1))
  return util.nhwc(latents), util.nhwc(noisy), outputs


def test_sd3_tower_matches_diffusers_pipeline(torch_vae, torch_transformer, tmp_path):
  """The whole tower at its default timestep, with the empty prompt's embeddings saved next to
  the pipeline (random here, so that they matter)."""
  root = _save_sd3_pipeline(tmp_path / "sd3-pipe", torch_vae, torch_transformer)
  rng = np.random.RandomState(10)
  context = rng.randn(3, 24).astype(np.float32)
  pooled = rng.randn(12).astype(np.float32)
  np.save(root / diffusion.EMPTY_PROMPT_EMBEDS, context)
  np.save(root / diffusion.EMPTY_PROMPT_POOLED_EMBEDS, pooled[None])
  tower, info = diffusion.load_tower(root)
  assert info.image_size == IMAGE_SIZE and info.denoiser == "transformer"
  assert isinstance(tower.denoiser, diffusion.MMDiT) and tower.timestep == 194
  assert tower.num_layers == 3 and tower.GRID_DEFAULT_LAYER == 1
  images = util.images(IMAGE_SIZE, seed=5)
  ref_latents, ref_noisy, ref = _reference_tower(torch_vae, torch_transformer, root, images,
                                                 tower, context[None], pooled[None])
  out = _tower(tower, images)
  util.assert_close(out.latents, ref_latents, "latents")
  util.assert_close(out.noisy_latents, ref_noisy, "noisy latents")
  assert len(out.hidden_states) == len(ref) == 3
  for i, (a, b) in enumerate(zip(out.hidden_states, ref)):
    util.assert_close(a, b, f"hidden_states[{i}]")
  with pytest.raises(ValueError, match="outside the schedule"):
    tower.with_timestep(1000)
  # t = N - 1 is pure noise: the latent no longer enters.
  assert tower.with_timestep(999).noise_coefficients() == (0.0, 1.0)


def test_zoo_loads_sd3_pipeline_as_vision_tower(torch_vae, torch_transformer, tmp_path):
  """``zoo.load(<SD3 pipeline dir>)`` without saved prompt embeddings (one zero token, zero
  pooled embedding): extraction features and patch grid are diffusers' computation; variants
  set the layer, timestep and size."""
  root = _save_sd3_pipeline(tmp_path / "sd3-pipe", torch_vae, torch_transformer)
  loaded = zoo.load(str(root))
  assert loaded.kind == "vision" and loaded.name == "sd3-pipe"
  assert loaded.num_layers == 3 and loaded.default_layer == loaded.model.GRID_DEFAULT_LAYER == 1
  assert loaded.preprocessing.image_size == (IMAGE_SIZE, IMAGE_SIZE)
  images = util.images(IMAGE_SIZE, seed=8)
  _, _, ref = _reference_tower(torch_vae, torch_transformer, root, images, loaded.model,
                               np.zeros((1, 1, 24), np.float32), np.zeros((1, 12), np.float32))
  grid = patch_grid_lib.patch_grid_fn(loaded)(images)
  util.assert_close(grid, ref[1], "patch grid")
  features = jax.jit(lambda x: loaded.features(loaded.model, {"pixels": x}, 1, "mean"))(images)
  util.assert_close(features, ref[1].mean(axis=(1, 2)), "extraction features")

  def with_variant(spec):
    return dataclasses.replace(zoo.resolve(spec), loader=lambda _path, name, _dtype:
                               dataclasses.replace(loaded, name=name)).load()

  variant = with_variant(f"{root}@layer=2,res=24,t=100")
  assert variant.default_layer == 2 and variant.model.timestep == 100
  assert variant.model.denoiser is loaded.model.denoiser
  assert variant.preprocessing.image_size == (24, 24)
  assert variant.model.schedule.model_timestep(100) == pytest.approx(
      1000 * 3 * 0.101 / (1 + 2 * 0.101), rel=1e-6)
  with pytest.raises(zoo.ZooError, match="timestep 1000"):
    with_variant(f"{root}@t=1000")
