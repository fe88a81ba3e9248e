"""Diffusion features as a vision tower: image → VAE latent → noised at t → one denoiser pass.

The Law of Vision Representation (and DIFT, diffusion hyperfeatures) read a diffusion model's
intermediate activations as image features. ``DiffusionTower`` computes them in one pass:

1. the VAE encoder's latent *mean* (not a sample), minus ``shift_factor`` (SD3's; 0 for the
   others), times ``scaling_factor``;
2. noised to timestep ``t`` (``pipeline.NoiseSchedule``): as DDPM's ``add_noise`` does,
   ``sqrt(alphas_cumprod[t]) * latent + sqrt(1 - alphas_cumprod[t]) * noise``, or for SD3's
   flow matching as ``FlowMatchEulerDiscreteScheduler.scale_noise`` does,
   ``(1 - sigma[t]) * latent + sigma[t] * noise``; the noise is fixed:
   ``jax.random.normal(jax.random.key(noise_seed), (1, h, w, c))`` for the latent's (h, w, c),
   the same for every image of every batch, so an image's features do not depend on its batch;
3. one forward pass of the denoiser, told t (DDPM) or sigma[t] * 1000 (flow matching), with an
   *empty-prompt* conditioning. The text encoders are not part of this port: the UNet's
   cross-attention and SD3's joint attention read ``empty_prompt_embeds.npy`` from the pipeline
   directory when there is one (the text encoders' output for "", saved once as (tokens, width)
   or (1, tokens, width), width the UNet's ``cross_attention_dim`` or SD3's
   ``joint_attention_dim``), else a single all-zero token (a UNet's cross-attention then
   returns its output bias; SD3 sees one token, its ``context_embedder`` bias, as its pipeline's
   zero T5 embeddings are when T5 is left out); SDXL's and SD3's pooled text embedding likewise
   comes from ``empty_prompt_pooled_embeds.npy`` or zeros, (``pooled_text_dim``,) /
   (``pooled_projection_dim``,); SDXL's six size / crop numbers are (H, W, 0, 0, H, W) of the
   input image. A DiT gets the null class.

``hidden_states`` are every UNet up block's output (coarsest first), or every DiT / SD3 joint
block's image tokens as a patch grid, all NHWC; ``patch_grid`` and ``GRID_DEFAULT_LAYER`` make
it a vision tower (``models.vlm``, ``features.patch_grid``). Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vlmsel_jax.models.checkpoint import CheckpointFileError, UnsupportedModelError
from vlmsel_jax.models.diffusion import dit as dit_lib
from vlmsel_jax.models.diffusion import mmdit as mmdit_lib
from vlmsel_jax.models.diffusion import pipeline
from vlmsel_jax.models.diffusion import unet as unet_lib
from vlmsel_jax.models.diffusion import vae as vae_lib

POOLINGS = ("mean", "patch_grid")
# DIFT's semantic-correspondence setting for Stable Diffusion: t = 261 of 1000, the output of
# up block 1 (``up_ft_index=1``). A flow-matching (SD3) tower defaults to the timestep of the same
# noise level instead (``pipeline.NoiseSchedule.default_timestep``).
DEFAULT_TIMESTEP = pipeline.DDPM_DEFAULT_TIMESTEP
DEFAULT_UNET_LAYER = 1
EMPTY_PROMPT_EMBEDS = "empty_prompt_embeds.npy"
EMPTY_PROMPT_POOLED_EMBEDS = "empty_prompt_pooled_embeds.npy"


class Conditioning(nnx.Variable):
  """A fixed conditioning tensor (the empty prompt's embeddings): state, never trained."""


@struct.dataclass
class DiffusionOutput:
  """What ``DiffusionTower.__call__`` returns (a pytree).

  Attributes:
    latents: (batch, h, w, c) the scaled VAE latent mean, before noising.
    noisy_latents: (batch, h, w, c) the latents noised to the tower's timestep.
    hidden_states: The NHWC feature maps: UNet up-block outputs, or DiT / SD3 block grids.
  """

  latents: jax.Array
  noisy_latents: jax.Array
  hidden_states: tuple[jax.Array, ...]


class DiffusionTower(nnx.Module):
  """VAE encoder + UNet, DiT or SD3 MMDiT, at one timestep with one fixed noise; see the module
  docstring.

  Attributes:
    vae: The ``VaeEncoder``.
    denoiser: The ``UNet2DCondition``, ``DiT`` or ``MMDiT``.
    schedule: The ``pipeline.NoiseSchedule`` (DDPM or flow matching).
    timestep: The diffusion timestep the latent is noised to (0 .. N - 1).
    noise_seed: Seed of the fixed noise.
  """

  def __init__(self, vae: vae_lib.VaeEncoder,
               denoiser: unet_lib.UNet2DCondition | dit_lib.DiT | mmdit_lib.MMDiT,
               schedule: pipeline.NoiseSchedule, *, timestep: int | None = None,
               noise_seed: int = 0, context: np.ndarray | None = None,
               pooled_text: np.ndarray | None = None):
    """``timestep`` None: the schedule's default (DIFT's 261 for DDPM)."""
    if vae.config.latent_channels != denoiser.config.in_channels:
      raise UnsupportedModelError(f"the VAE makes {vae.config.latent_channels}-channel latents, "
                                  f"the denoiser takes {denoiser.config.in_channels}")
    self.vae = vae
    self.denoiser = denoiser
    self.schedule = schedule
    self.timestep = schedule.check(schedule.default_timestep if timestep is None else timestep)
    self.noise_seed = int(noise_seed)
    dtype = denoiser.dtype
    conditioning, pooled = None, None
    if isinstance(denoiser, mmdit_lib.MMDiT):
      c = denoiser.config
      conditioning = (np.zeros((1, 1, c.joint_attention_dim), np.float32) if context is None
                      else np.asarray(context, np.float32).reshape(1, -1, c.joint_attention_dim))
      pooled = (np.zeros((1, c.pooled_projection_dim), np.float32) if pooled_text is None
                else np.asarray(pooled_text, np.float32).reshape(1, c.pooled_projection_dim))
      conditioning = Conditioning(jnp.asarray(conditioning, dtype))
      pooled = Conditioning(jnp.asarray(pooled, dtype))
    elif isinstance(denoiser, unet_lib.UNet2DCondition):
      c = denoiser.config
      if len(set(c.cross_attention_dim)) != 1:
        raise UnsupportedModelError("a UNet whose blocks cross-attend to different widths "
                                    f"{c.cross_attention_dim} takes no single conditioning")
      width = c.cross_attention_dim[0]
      conditioning = (np.zeros((1, 1, width), np.float32) if context is None
                      else np.asarray(context, np.float32).reshape(1, -1, width))
      conditioning = Conditioning(jnp.asarray(conditioning, dtype))
      if c.addition_embed_type == "text_time":
        pooled = (np.zeros((1, c.pooled_text_dim), np.float32) if pooled_text is None
                  else np.asarray(pooled_text, np.float32).reshape(1, c.pooled_text_dim))
        pooled = Conditioning(jnp.asarray(pooled, dtype))
    self.context = conditioning
    self.pooled_text = pooled

  @property
  def num_layers(self) -> int:
    """How many feature maps ``hidden_states`` holds."""
    if isinstance(self.denoiser, (dit_lib.DiT, mmdit_lib.MMDiT)):
      return self.denoiser.config.num_layers
    return self.denoiser.config.num_blocks

  # The vision-tower protocol (see ``vit.Vit.patch_grid``): DIFT's up block 1 for a UNet; for a
  # DiT or SD3's MMDiT, which have no established choice, the middle block (neither the patch
  # embedding's neighbourhood nor the blocks that shape the noise prediction).
  @property
  def GRID_DEFAULT_LAYER(self) -> int:  # pylint: disable=invalid-name
    if isinstance(self.denoiser, (dit_lib.DiT, mmdit_lib.MMDiT)):
      return self.num_layers // 2
    return min(DEFAULT_UNET_LAYER, self.num_layers - 1)

  def patch_grid(self, pixels: jax.Array, layer: int) -> jax.Array:
    """(batch, rows, cols, channels): the NHWC map ``hidden_states[layer]``."""
    return self(pixels).hidden_states[layer]

  def with_timestep(self, timestep: int) -> DiffusionTower:
    """The same tower (shared weights) at another timestep."""
    return DiffusionTower(
        self.vae, self.denoiser, self.schedule, timestep=timestep, noise_seed=self.noise_seed,
        context=None if self.context is None else np.asarray(self.context[...], np.float32),
        pooled_text=(None if self.pooled_text is None
                     else np.asarray(self.pooled_text[...], np.float32)))

  def noise(self, latent_shape: tuple[int, int, int]) -> jax.Array:
    """The fixed (1, h, w, c) float32 noise for a latent of shape (h, w, c)."""
    return jax.random.normal(jax.random.key(self.noise_seed), (1, *latent_shape), jnp.float32)

  def noise_coefficients(self) -> tuple[float, float]:
    """(signal, noise) factors at the tower's timestep: (sqrt(alphas_cumprod[t]),
    sqrt(1 - alphas_cumprod[t])) or (1 - sigma[t], sigma[t]), in float32 as diffusers'
    ``add_noise`` / ``scale_noise`` compute them."""
    return self.schedule.coefficients(self.timestep)

  def __call__(self, pixels: jax.Array) -> DiffusionOutput:
    """Features of a batch of (batch, H, W, 3) NHWC images in [-1, 1]."""
    latents = self.vae.latent(pixels).astype(jnp.float32)
    b, h, w, c = latents.shape
    signal, noise_scale = self.noise_coefficients()
    noisy = signal * latents + noise_scale * self.noise((h, w, c))
    t = jnp.full((b,), self.schedule.model_timestep(self.timestep), jnp.float32)
    if isinstance(self.denoiser, dit_lib.DiT):
      out = self.denoiser(noisy, t)
    elif isinstance(self.denoiser, mmdit_lib.MMDiT):
      out = self.denoiser(noisy, t, self.context[...], self.pooled_text[...])
    else:
      time_ids = None
      if self.pooled_text is not None:
        size_h, size_w = pixels.shape[1:3]
        time_ids = jnp.asarray([[size_h, size_w, 0, 0, size_h, size_w]], jnp.float32)
      out = self.denoiser(noisy, t, self.context[...],
                          pooled_text=None if self.pooled_text is None else self.pooled_text[...],
                          time_ids=None if time_ids is None else jnp.broadcast_to(time_ids, (b, 6)))
    return DiffusionOutput(latents=latents, noisy_latents=noisy,
                           hidden_states=tuple(out.hidden_states))


def select_features(output: DiffusionOutput, layer: int = DEFAULT_UNET_LAYER,
                    pooling: str = "mean") -> jax.Array:
  """One image representation out of a ``DiffusionOutput``; jittable (layer, pooling static).

  ``"mean"``: the spatial mean of ``hidden_states[layer]`` (batch, channels); ``"patch_grid"``:
  the map itself (batch, rows, cols, channels).
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
  h = output.hidden_states[layer]
  return jnp.mean(h, axis=(1, 2)) if pooling == "mean" else h


@dataclasses.dataclass(frozen=True)
class TowerInfo:
  """What a loaded pipeline's tower expects.

  Attributes:
    image_size: Native input side in pixels: the denoiser's latent ``sample_size`` times the
      VAE's downscale.
    denoiser: "unet" or "transformer".
  """

  image_size: int
  denoiser: str


def _optional_npy(path: Path) -> np.ndarray | None:
  if not path.is_file():
    return None
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise CheckpointFileError(f"{path}: not a readable .npy array ({e})") from None


def load_tower(path: str | os.PathLike, *, dtype: Any = "float32",
               timestep: int | None = None, noise_seed: int = 0
               ) -> tuple[DiffusionTower, TowerInfo]:
  """Loads a diffusers pipeline directory as a ``DiffusionTower``.

  Args:
    path: The directory with ``model_index.json``, ``vae/``, ``unet/`` or ``transformer/`` and
      ``scheduler/scheduler_config.json`` (optionally ``empty_prompt_embeds.npy`` and
      ``empty_prompt_pooled_embeds.npy``, see the module docstring).
    dtype: "float32" or "bfloat16".
    timestep: The timestep features are taken at; None: the schedule's default (DIFT's 261
      for DDPM, the timestep of the same noise level for flow matching).
    noise_seed: Seed of the fixed noise.

  Raises:
    CheckpointFileError: a missing or corrupt file (named).
    UnsupportedModelError: a component or setting this port does not implement.
    CheckpointError: the weights do not fit the configs (every problem listed).
  """
  layout = pipeline.PipelineLayout.read(path)
  root = layout.path
  vae = pipeline.load_vae(root / "vae", dtype)
  if layout.denoiser == "unet":
    denoiser = pipeline.load_unet(root / "unet", dtype)
  elif layout.is_sd3:
    denoiser = pipeline.load_mmdit(root / "transformer", dtype)
  else:
    denoiser = pipeline.load_dit(root / "transformer", dtype)
  schedule_file = root / "scheduler" / "scheduler_config.json"
  schedule = pipeline.NoiseSchedule.read(pipeline.read_json(schedule_file), str(schedule_file))
  tower = DiffusionTower(vae, denoiser, schedule, timestep=timestep,
                         noise_seed=noise_seed,
                         context=_optional_npy(root / EMPTY_PROMPT_EMBEDS),
                         pooled_text=_optional_npy(root / EMPTY_PROMPT_POOLED_EMBEDS))
  size = denoiser.config.sample_size * vae.config.downscale
  return tower, TowerInfo(image_size=size, denoiser=layout.denoiser)
