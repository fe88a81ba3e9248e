"""Diffusion features (Stable Diffusion 1.x / 2.x / XL UNets, DiT, Stable Diffusion 3's MMDiT) as
vision towers, in Flax NNX.

``layers``: the diffusers building blocks; ``vae``: the ``AutoencoderKL`` encoder; ``unet``:
``UNet2DConditionModel``; ``dit``: ``DiTTransformer2DModel``; ``mmdit``: ``SD3Transformer2DModel``;
``params``: their key tables for diffusers' safetensors; ``pipeline``: reading a pipeline
directory and the noise schedule (DDPM or flow matching); ``tower``: image → latent → noised →
one denoiser pass → NHWC feature maps (``DiffusionTower``).
"""

from vlmsel_jax.models.diffusion.dit import DiT, DiTConfig, DiTOutput
from vlmsel_jax.models.diffusion.mmdit import MMDiT, MMDiTConfig, MMDiTOutput
from vlmsel_jax.models.diffusion.params import (
    dit_key_table,
    mmdit_key_table,
    unet_key_table,
    vae_key_table,
)
from vlmsel_jax.models.diffusion.pipeline import (
    Component,
    NoiseSchedule,
    PipelineLayout,
    alphas_cumprod,
    flow_match_sigmas,
    is_pipeline_dir,
    load_dit,
    load_mmdit,
    load_unet,
    load_vae,
)
from vlmsel_jax.models.diffusion.tower import (
    DEFAULT_TIMESTEP,
    EMPTY_PROMPT_EMBEDS,
    EMPTY_PROMPT_POOLED_EMBEDS,
    POOLINGS,
    DiffusionOutput,
    DiffusionTower,
    TowerInfo,
    load_tower,
    select_features,
)
from vlmsel_jax.models.diffusion.unet import UNet2DCondition, UNetConfig, UNetOutput
from vlmsel_jax.models.diffusion.vae import VaeConfig, VaeEncoder

__all__ = [
    "DEFAULT_TIMESTEP",
    "EMPTY_PROMPT_EMBEDS",
    "EMPTY_PROMPT_POOLED_EMBEDS",
    "POOLINGS",
    "Component",
    "DiT",
    "DiTConfig",
    "DiTOutput",
    "DiffusionOutput",
    "DiffusionTower",
    "MMDiT",
    "MMDiTConfig",
    "MMDiTOutput",
    "NoiseSchedule",
    "PipelineLayout",
    "TowerInfo",
    "UNet2DCondition",
    "UNetConfig",
    "UNetOutput",
    "VaeConfig",
    "VaeEncoder",
    "alphas_cumprod",
    "dit_key_table",
    "flow_match_sigmas",
    "is_pipeline_dir",
    "load_dit",
    "load_mmdit",
    "load_tower",
    "load_unet",
    "load_vae",
    "mmdit_key_table",
    "select_features",
    "unet_key_table",
    "vae_key_table",
]
