"""diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x, 2.x and XL) in Flax NNX, for features.

The noise-prediction UNet: a sinusoidal timestep embedding through an MLP (plus, for SDXL, the
``text_time`` added embedding of the pooled text embedding and the six size / crop numbers),
``conv_in``, down blocks (``DownBlock2D``: resnets; ``CrossAttnDownBlock2D``: resnets each
followed by a ``Transformer2DModel`` that cross-attends to the text conditioning), the mid block
(resnet, transformer, resnet), and up blocks that concatenate the down path's skip connections.
``UNet2DCondition.__call__`` returns every up block's output (after its upsampler), the
features diffusion-feature methods read (DIFT's ``up_ft_index``); ``conv_norm_out`` / ``conv_out``
(the noise prediction) are not built.

Configs: SD 1.x ``attention_head_dim=8`` (a legacy name: diffusers reads it as the number of
heads), 1x1-conv projections; SD 2.x per-block head counts and ``use_linear_projection``; SDXL
``transformer_layers_per_block`` per block and ``addition_embed_type="text_time"``. Anything else
diffusers' class can be configured to do raises ``UnsupportedModelError`` naming the setting.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vlmsel_jax.models.checkpoint import UnsupportedModelError
from vlmsel_jax.models.diffusion import layers

SUPPORTED_CLASSES = ("UNet2DConditionModel",)
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# Config fields that must keep diffusers' default for this port to compute the same thing.
_DEFAULTS_REQUIRED = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "act_fn": "silu",
}


def _is_default(value: Any, default: Any) -> bool:
  """Whether a config value means the default: equal to it, or, for a False / None default, a
  False, None or a per-block list of them (``only_cross_attention=[false, false]``)."""
  if value == default:
    return True
  if default in (False, None):
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(v in (False, None) for v in values)
  return False


def _per_block(value: Any, n: int, name: str) -> tuple[Any, ...]:
  """An int (or None) repeated per block, or a per-block list checked for length."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise UnsupportedModelError(f"{name} has {len(value)} entries for {n} blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """A ``UNet2DConditionModel`` config, resolved per block as diffusers' constructor does.

  Attributes:
    in_channels: Latent channels.
    block_out_channels: Channels of each down block (the up blocks mirror them).
    down_block_types: ``CrossAttnDownBlock2D`` / ``DownBlock2D`` per block.
    up_block_types: ``CrossAttnUpBlock2D`` / ``UpBlock2D`` per block.
    mid_block_type: ``UNetMidBlock2DCrossAttn`` or None (no mid block).
    layers_per_block: Resnets per down block (an up block has one more).
    transformer_layers_per_block: Transformer blocks per attention layer, per down block.
    reverse_transformer_layers_per_block: The same per up block (None: the down values reversed).
    num_attention_heads: Heads per down block (diffusers' ``num_attention_heads or
      attention_head_dim``).
    cross_attention_dim: Width of the conditioning per down block.
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon of the resnets.
    use_linear_projection: Linear (not 1x1 conv) projections around the transformers.
    flip_sin_to_cos: Cosines first in the timestep sinusoids.
    freq_shift: ``downscale_freq_shift`` of the timestep sinusoids.
    time_embed_dim: Width of the time embedding (``4 * block_out_channels[0]`` by default).
    mid_block_scale_factor: Output scale of the mid block's resnets.
    addition_embed_type: None, or "text_time" (SDXL).
    addition_time_embed_dim: Sinusoid width of each SDXL size / crop number.
    projection_class_embeddings_input_dim: Input width of SDXL's added embedding (pooled text
      embedding + 6 * ``addition_time_embed_dim``).
    sample_size: The latent side the model was trained at.
  """

  in_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  reverse_transformer_layers_per_block: tuple[int, ...] | None = None
  num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
  cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  time_embed_dim: int | None = None
  mid_block_scale_factor: float = 1.0
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  sample_size: int = 64

  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  @property
  def temb_dim(self) -> int:
    return self.time_embed_dim or 4 * self.block_out_channels[0]

  @property
  def pooled_text_dim(self) -> int:
    """SDXL: width of the pooled text embedding the added embedding takes."""
    if self.addition_embed_type != "text_time":
      return 0
    return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], source: str = "unet") -> UNetConfig:
    """Reads a ``UNet2DConditionModel`` ``config.json`` dict.

    Raises:
      UnsupportedModelError: another class, or settings this port does not implement (all
        listed).
    """
    name = config.get("_class_name", "UNet2DConditionModel")
    if name not in SUPPORTED_CLASSES:
      raise UnsupportedModelError(f"{source}: UNet class {name!r} is not supported; supported: "
                                  f"{', '.join(SUPPORTED_CLASSES)}")
    problems = [f"{k}={config[k]!r} (needs {v!r})" for k, v in _DEFAULTS_REQUIRED.items()
                if k in config and not _is_default(config[k], v)]
    down = tuple(config.get("down_block_types", cls.down_block_types))
    up = tuple(config.get("up_block_types", cls.up_block_types))
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    problems += [f"down block {b!r}" for b in down if b not in DOWN_BLOCKS]
    problems += [f"up block {b!r}" for b in up if b not in UP_BLOCKS]
    if mid not in MID_BLOCKS:
      problems.append(f"mid_block_type {mid!r}")
    added = config.get("addition_embed_type")
    if added not in (None, "text_time"):
      problems.append(f"addition_embed_type {added!r} (only None or 'text_time')")
    if config.get("norm_num_groups", 32) is None:
      problems.append("norm_num_groups=None")
    if problems:
      raise UnsupportedModelError(f"{source}: unsupported UNet setting(s): {'; '.join(problems)}")
    n = len(down)
    channels = tuple(int(c) for c in config.get("block_out_channels", cls.block_out_channels))
    if len(channels) != n or len(up) != n:
      raise UnsupportedModelError(f"{source}: {len(channels)} block_out_channels, {n} down and "
                                  f"{len(up)} up blocks must agree")
    # diffusers' naming issue #2011: ``attention_head_dim`` holds the number of heads.
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    reverse = config.get("reverse_transformer_layers_per_block")
    if reverse is not None:
      reverse = tuple(int(r[0]) if isinstance(r, (list, tuple)) else int(r) for r in reverse)
    transformer_layers = config.get("transformer_layers_per_block", 1)
    if isinstance(transformer_layers, (list, tuple)) and any(
        isinstance(t, (list, tuple)) for t in transformer_layers):
      raise UnsupportedModelError(f"{source}: per-layer transformer_layers_per_block lists")
    return cls(
        in_channels=int(config.get("in_channels", 4)),
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid,
        layers_per_block=tuple(int(v) for v in _per_block(
            config.get("layers_per_block", 2), n, "layers_per_block")),
        transformer_layers_per_block=tuple(int(v) for v in _per_block(
            transformer_layers, n, "transformer_layers_per_block")),
        reverse_transformer_layers_per_block=reverse,
        num_attention_heads=tuple(int(v) for v in _per_block(heads, n, "attention_head_dim")),
        cross_attention_dim=tuple(int(v) for v in _per_block(
            config.get("cross_attention_dim", 1280), n, "cross_attention_dim")),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        freq_shift=float(config.get("freq_shift", 0)),
        time_embed_dim=config.get("time_embedding_dim"),
        mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
        addition_embed_type=added,
        addition_time_embed_dim=config.get("addition_time_embed_dim"),
        projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
        sample_size=int(config.get("sample_size") or 64))


class DownBlock(nnx.Module):
  """``DownBlock2D`` / ``CrossAttnDownBlock2D``: (resnet [, transformer]) x n, then a stride-2
  conv (but in the last block); returns the output and every intermediate for the skips."""

  def __init__(self, cin: int, cout: int, *, cross_attention: bool, num_layers: int,
               transformer_layers: int, heads: int, context_dim: int, config: UNetConfig,
               temb: int, downsample: bool, dtype: Any):
    c = config
    self.resnets = nnx.List([
        layers.ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=temb,
                             groups=c.norm_num_groups, eps=c.norm_eps, dtype=dtype)
        for i in range(num_layers)])
    self.attentions = nnx.List([
        layers.Transformer2DModel(cout, heads=heads, num_layers=transformer_layers,
                                  context_dim=context_dim, groups=c.norm_num_groups,
                                  use_linear_projection=c.use_linear_projection, dtype=dtype)
        for _ in range(num_layers)] if cross_attention else [])
    self.downsampler = (layers.Downsample2D(cout, padding=1, dtype=dtype)
                        if downsample else None)

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    states = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if len(self.attentions):
        x = self.attentions[i](x, context)
      states.append(x)
    if self.downsampler is not None:
      x = self.downsampler(x)
      states.append(x)
    return x, tuple(states)


class MidBlock(nnx.Module):
  """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

  def __init__(self, channels: int, *, transformer_layers: int, heads: int, context_dim: int,
               config: UNetConfig, temb: int, dtype: Any):
    c = config
    self.resnets = nnx.List([
        layers.ResnetBlock2D(channels, channels, temb_channels=temb, groups=c.norm_num_groups,
                             eps=c.norm_eps, output_scale_factor=c.mid_block_scale_factor,
                             dtype=dtype) for _ in range(2)])
    self.attentions = nnx.List([
        layers.Transformer2DModel(channels, heads=heads, num_layers=transformer_layers,
                                  context_dim=context_dim, groups=c.norm_num_groups,
                                  use_linear_projection=c.use_linear_projection, dtype=dtype)])

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    x = self.resnets[0](x, temb)
    x = self.attentions[0](x, context)
    return self.resnets[1](x, temb)


class UpBlock(nnx.Module):
  """``UpBlock2D`` / ``CrossAttnUpBlock2D``: (concat a skip, resnet [, transformer]) x n, then
  nearest upsampling and a conv (but in the last block)."""

  def __init__(self, cin: int, prev: int, cout: int, *, cross_attention: bool, num_layers: int,
               transformer_layers: int, heads: int, context_dim: int, config: UNetConfig,
               temb: int, upsample: bool, dtype: Any):
    c = config
    resnets = []
    for i in range(num_layers):
      skip = cin if i == num_layers - 1 else cout
      resnets.append(layers.ResnetBlock2D((prev if i == 0 else cout) + skip, cout,
                                          temb_channels=temb, groups=c.norm_num_groups,
                                          eps=c.norm_eps, dtype=dtype))
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List([
        layers.Transformer2DModel(cout, heads=heads, num_layers=transformer_layers,
                                  context_dim=context_dim, groups=c.norm_num_groups,
                                  use_linear_projection=c.use_linear_projection, dtype=dtype)
        for _ in range(num_layers)] if cross_attention else [])
    self.upsampler = layers.Upsample2D(cout, dtype=dtype) if upsample else None

  def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
               context: jax.Array, size: tuple[int, int] | None) -> jax.Array:
    skips = list(skips)
    for i, resnet in enumerate(self.resnets):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = resnet(x, temb)
      if len(self.attentions):
        x = self.attentions[i](x, context)
    if self.upsampler is not None:
      x = self.upsampler(x, size)
    return x


@struct.dataclass
class UNetOutput:
  """What ``UNet2DCondition.__call__`` returns (a pytree).

  Attributes:
    hidden_states: Every up block's NHWC output, ``up_blocks[0]`` (coarsest) first.
  """

  hidden_states: tuple[jax.Array, ...]


class UNet2DCondition(nnx.Module):
  """A ``UNet2DConditionModel`` up to its last up block (NHWC latents)."""

  def __init__(self, config: UNetConfig, *, dtype: Any = jnp.float32):
    c = config
    self.config = c
    self.dtype = jnp.dtype(dtype)
    n = c.num_blocks
    ch = c.block_out_channels
    temb = c.temb_dim
    self.conv_in = layers.conv(c.in_channels, ch[0], 3, dtype)
    self.time_embedding = layers.TimestepEmbedding(ch[0], temb, dtype)
    self.add_embedding = (
        layers.TimestepEmbedding(c.projection_class_embeddings_input_dim, temb, dtype)
        if c.addition_embed_type == "text_time" else None)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], ch[i], cross_attention=c.down_block_types[i] == DOWN_BLOCKS[0],
                  num_layers=c.layers_per_block[i],
                  transformer_layers=c.transformer_layers_per_block[i],
                  heads=c.num_attention_heads[i], context_dim=c.cross_attention_dim[i], config=c,
                  temb=temb, downsample=i < n - 1, dtype=dtype)
        for i in range(n)])
    self.mid_block = (
        MidBlock(ch[-1], transformer_layers=c.transformer_layers_per_block[-1],
                 heads=c.num_attention_heads[-1], context_dim=c.cross_attention_dim[-1],
                 config=c, temb=temb, dtype=dtype)
        if c.mid_block_type is not None else None)
    rev_ch = ch[::-1]
    rev_transformer = (c.reverse_transformer_layers_per_block
                       or c.transformer_layers_per_block[::-1])
    up = []
    for i in range(n):
      up.append(UpBlock(rev_ch[min(i + 1, n - 1)], rev_ch[max(i - 1, 0)], rev_ch[i],
                        cross_attention=c.up_block_types[i] == UP_BLOCKS[0],
                        num_layers=c.layers_per_block[::-1][i] + 1,
                        transformer_layers=rev_transformer[i],
                        heads=c.num_attention_heads[::-1][i],
                        context_dim=c.cross_attention_dim[::-1][i], config=c, temb=temb,
                        upsample=i < n - 1, dtype=dtype))
    self.up_blocks = nnx.List(up)

  def embed_time(self, timesteps: jax.Array, batch: int, pooled_text: jax.Array | None,
                 time_ids: jax.Array | None) -> jax.Array:
    """The (batch, temb) embedding every resnet receives: timestep MLP (+ SDXL's added one)."""
    c = self.config
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = layers.timestep_embedding(t, c.block_out_channels[0],
                                      flip_sin_to_cos=c.flip_sin_to_cos,
                                      downscale_freq_shift=c.freq_shift)
    emb = self.time_embedding(t_emb.astype(self.dtype))
    if self.add_embedding is not None:
      if pooled_text is None or time_ids is None:
        raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs pooled_text and "
                         "time_ids")
      ids = layers.timestep_embedding(jnp.asarray(time_ids, jnp.float32).reshape(-1),
                                      c.addition_time_embed_dim,
                                      flip_sin_to_cos=c.flip_sin_to_cos,
                                      downscale_freq_shift=c.freq_shift).reshape(batch, -1)
      added = jnp.concatenate([jnp.broadcast_to(pooled_text, (batch, pooled_text.shape[-1])),
                               ids], axis=-1)
      emb = emb + self.add_embedding(added.astype(self.dtype))
    return emb

  def __call__(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array, *,
               pooled_text: jax.Array | None = None,
               time_ids: jax.Array | None = None) -> UNetOutput:
    """Runs the UNet on NHWC latents up to its last up block.

    Args:
      latents: (batch, h, w, in_channels) noised latents.
      timesteps: A scalar or (batch,) diffusion timesteps.
      context: (batch or 1, tokens, cross_attention_dim) text conditioning
        (``encoder_hidden_states``).
      pooled_text: SDXL only: (batch or 1, pooled_text_dim) pooled text embedding.
      time_ids: SDXL only: (batch or 1, 6) original size, crop top-left, target size.

    Returns:
      A ``UNetOutput`` with every up block's output.
    """
    b, h, w, _ = latents.shape
    emb = self.embed_time(timesteps, b, pooled_text, time_ids)
    context = jnp.broadcast_to(context, (b,) + context.shape[1:]).astype(self.dtype)
    x = self.conv_in(latents.astype(self.dtype))
    skips: tuple[jax.Array, ...] = (x,)
    for block in self.down_blocks:
      x, states = block(x, emb, context)
      skips += states
    if self.mid_block is not None:
      x = self.mid_block(x, emb, context)
    # diffusers passes the skip's size to the upsampler when the input is not a multiple of
    # 2 ** (blocks - 1), so odd sizes round the way the down path did.
    factor = 2 ** (self.config.num_blocks - 1)
    forward_size = h % factor != 0 or w % factor != 0
    hidden = []
    for i, block in enumerate(self.up_blocks):
      n = len(block.resnets)
      block_skips, skips = skips[-n:], skips[:-n]
      size = tuple(skips[-1].shape[1:3]) if forward_size and i < len(self.up_blocks) - 1 else None
      x = block(x, block_skips, emb, context, size)
      hidden.append(x)
    return UNetOutput(hidden_states=tuple(hidden))
