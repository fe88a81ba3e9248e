"""Diffusion features (Stable Diffusion 1.x / 2.x / XL UNets, DiT) as vision towers, in Flax NNX.

``layers``: the diffusers building blocks; ``vae``: the ``AutoencoderKL`` encoder; ``unet``:
``UNet2DConditionModel``; ``dit``: ``DiTTransformer2DModel``; ``params``: their key tables for
diffusers' safetensors; ``pipeline``: reading a pipeline directory and the noise schedule;
``tower``: image → latent → noised → one denoiser pass → NHWC feature maps (``DiffusionTower``).
"""

from vlmsel_jax.models.diffusion.dit import DiT, DiTConfig, DiTOutput
from vlmsel_jax.models.diffusion.params import dit_key_table, unet_key_table, vae_key_table
from vlmsel_jax.models.diffusion.pipeline import (
    Component,
    PipelineLayout,
    alphas_cumprod,
    is_pipeline_dir,
    load_dit,
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
    "PipelineLayout",
    "TowerInfo",
    "UNet2DCondition",
    "UNetConfig",
    "UNetOutput",
    "VaeConfig",
    "VaeEncoder",
    "alphas_cumprod",
    "dit_key_table",
    "is_pipeline_dir",
    "load_dit",
    "load_tower",
    "load_unet",
    "load_vae",
    "select_features",
    "unet_key_table",
    "vae_key_table",
]
