"""The encoder half of diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE), in Flax NNX.

An image in [-1, 1] becomes the latent a diffusion model denoises: ``conv_in``, the
``DownEncoderBlock2D`` stack (resnets, a stride-2 conv between resolutions), the mid block
(resnet, single-head spatial self-attention, resnet), GroupNorm, SiLU, ``conv_out`` and
``quant_conv`` give the diagonal Gaussian's mean and log-variance.

The latent is the *mean* of that Gaussian, not a sample of it: the Law of Vision
Representation's diffusion features and diffusion-hyperfeature / DIFT-style extraction use the
mean, and it keeps features deterministic. ``VaeEncoder.latent`` returns
``(mean - shift_factor) * scaling_factor`` (``shift_factor`` is absent, i.e. 0, for SD 1.x /
2.x / XL), the scale the diffusion model was trained on. The decoder is not built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlmsel_jax.models.checkpoint import UnsupportedModelError
from vlmsel_jax.models.diffusion import layers

SUPPORTED_CLASSES = ("AutoencoderKL",)


@dataclasses.dataclass(frozen=True)
class VaeConfig:
  """The encoder's hyper-parameters, as diffusers' ``AutoencoderKL`` config names them.

  Attributes:
    in_channels: Image channels.
    latent_channels: Channels of the latent.
    block_out_channels: Channels of each down block; every block but the last halves the size.
    layers_per_block: Resnets per down block.
    norm_num_groups: GroupNorm groups.
    scaling_factor: Multiplies the latent mean (0.18215 for SD 1.x / 2.x, 0.13025 for SDXL).
    shift_factor: Subtracted from the mean before scaling (None: 0).
    use_quant_conv: Whether the 1x1 ``quant_conv`` follows the encoder.
    mid_block_add_attention: Whether the mid block has its attention layer.
  """

  in_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downscale(self) -> int:
    """Image pixels per latent pixel, per side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], source: str = "vae") -> VaeConfig:
    """Reads an ``AutoencoderKL`` ``config.json`` dict.

    Raises:
      UnsupportedModelError: another class, or a setting this port does not implement.
    """
    name = config.get("_class_name", "AutoencoderKL")
    if name not in SUPPORTED_CLASSES:
      raise UnsupportedModelError(f"{source}: VAE class {name!r} is not supported; supported: "
                                  f"{', '.join(SUPPORTED_CLASSES)}")
    blocks = tuple(config.get("down_block_types", ("DownEncoderBlock2D",)))
    problems = []
    if any(b != "DownEncoderBlock2D" for b in blocks):
      problems.append(f"down_block_types {list(blocks)} (only DownEncoderBlock2D)")
    if config.get("act_fn", "silu") != "silu":
      problems.append(f"act_fn {config.get('act_fn')!r} (only silu)")
    if problems:
      raise UnsupportedModelError(f"{source}: unsupported VAE setting(s): {'; '.join(problems)}")
    channels = tuple(int(c) for c in config.get("block_out_channels", (64,)))
    if len(channels) != len(blocks):
      raise UnsupportedModelError(f"{source}: {len(channels)} block_out_channels for "
                                  f"{len(blocks)} down blocks")
    shift = config.get("shift_factor")
    return cls(in_channels=int(config.get("in_channels", 3)),
               latent_channels=int(config.get("latent_channels", 4)),
               block_out_channels=channels,
               layers_per_block=int(config.get("layers_per_block", 1)),
               norm_num_groups=int(config.get("norm_num_groups", 32)),
               scaling_factor=float(config.get("scaling_factor", 0.18215)),
               shift_factor=None if shift is None else float(shift),
               use_quant_conv=bool(config.get("use_quant_conv", True)),
               mid_block_add_attention=bool(config.get("mid_block_add_attention", True)))


class DownEncoderBlock2D(nnx.Module):
  """Resnets without time embedding, then (but in the last block) a stride-2 conv."""

  def __init__(self, cin: int, cout: int, *, num_layers: int, groups: int, downsample: bool,
               dtype: Any):
    self.resnets = nnx.List([
        layers.ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups,
                             eps=1e-6, dtype=dtype)
        for i in range(num_layers)])
    self.downsampler = (layers.Downsample2D(cout, padding=0, dtype=dtype)
                        if downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x, None)
    return self.downsampler(x) if self.downsampler is not None else x


class VaeMidBlock(nnx.Module):
  """``UNetMidBlock2D`` of the encoder: resnet, [spatial self-attention + input], resnet."""

  def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype: Any):
    self.resnets = nnx.List([
        layers.ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=1e-6,
                             dtype=dtype) for _ in range(2)])
    # One head as wide as the channels (attention_head_dim = channels), biased projections.
    self.attentions = nnx.List([
        layers.Attention(channels, heads=1, head_dim=channels, qkv_bias=True,
                         group_norm=(groups, 1e-6), dtype=dtype)
    ] if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x, None)
    for attn in self.attentions:
      b, h, w, c = x.shape
      x = x + attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)
    return self.resnets[1](x, None)


class VaeEncoder(nnx.Module):
  """``AutoencoderKL.encoder`` + ``quant_conv``: NHWC images in [-1, 1] → latent moments."""

  def __init__(self, config: VaeConfig, *, dtype: Any = jnp.float32):
    c = config
    self.config = c
    self.dtype = jnp.dtype(dtype)
    channels = c.block_out_channels
    self.conv_in = layers.conv(c.in_channels, channels[0], 3, dtype)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], num_layers=c.layers_per_block,
                           groups=c.norm_num_groups, downsample=i < len(channels) - 1,
                           dtype=dtype)
        for i in range(len(channels))])
    self.mid_block = VaeMidBlock(channels[-1], groups=c.norm_num_groups,
                                 add_attention=c.mid_block_add_attention, dtype=dtype)
    self.conv_norm_out = layers.GroupNorm(c.norm_num_groups, channels[-1], 1e-6, dtype)
    self.conv_out = layers.conv(channels[-1], 2 * c.latent_channels, 3, dtype)
    self.quant_conv = (layers.conv(2 * c.latent_channels, 2 * c.latent_channels, 1, dtype)
                       if c.use_quant_conv else None)

  def moments(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar) of the latent Gaussian, each (batch, h / f, w / f, latent_channels)."""
    if pixels.ndim != 4 or pixels.shape[-1] != self.config.in_channels:
      raise ValueError(f"pixels must be NHWC with {self.config.in_channels} channels; got shape "
                       f"{tuple(pixels.shape)}")
    x = self.conv_in(pixels.astype(self.dtype))
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    x = self.conv_out(layers.silu(self.conv_norm_out(x)))
    if self.quant_conv is not None:
      x = self.quant_conv(x)
    mean, logvar = jnp.split(x, 2, axis=-1)
    return mean, logvar

  def latent(self, pixels: jax.Array) -> jax.Array:
    """The scaled latent mean the diffusion model takes: (mean - shift) * scaling_factor."""
    mean, _ = self.moments(pixels)
    if self.config.shift_factor is not None:
      mean = mean - self.config.shift_factor
    return mean * self.config.scaling_factor

  def __call__(self, pixels: jax.Array) -> jax.Array:
    return self.latent(pixels)
