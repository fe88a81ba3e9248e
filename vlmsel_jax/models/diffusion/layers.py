"""The building blocks diffusers' UNets, VAE encoder and DiT share, in Flax NNX (NHWC).

Each module mirrors one diffusers module and keeps its attribute names, so that a checkpoint key
maps to an NNX key by a fixed rename (``params``): ``ResnetBlock2D``, ``Downsample2D``,
``Upsample2D``, ``Attention`` (the ``AttnProcessor2_0`` computation), ``FeedForward`` (GEGLU or
GELU), ``BasicTransformerBlock`` (``norm_type="layer_norm"``: self-, cross-attention, MLP),
``Transformer2DModel`` (continuous input: GroupNorm, projection in, blocks, projection out,
residual), ``TimestepEmbedding`` and the sinusoidal ``timestep_embedding``.

Images and feature maps are NHWC here where diffusers is NCHW; torch's default padding and
nearest-neighbour upsampling are reproduced exactly. Normalisation statistics are computed in
float32 whatever the parameter dtype.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.models import attention as attention_lib

FEED_FORWARD_ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")


def silu(x: jax.Array) -> jax.Array:
  """torch.nn.SiLU: x * sigmoid(x)."""
  return x * jax.nn.sigmoid(x)


class Conv2d(nnx.Module):
  """torch ``nn.Conv2d`` (bias included) on NHWC input; the kernel is (kh, kw, in, out), as
  ``nnx.Conv`` keeps it, so ``Transform.CONV`` fills it.

  The parameters start at zero: the module is only ever filled from a checkpoint, and it is built
  abstractly first (``nnx.eval_shape``), where a random initializer per layer (a diffusion UNet
  has hundreds) costs far more to trace than the whole model's zeros.
  """

  def __init__(self, cin: int, cout: int, kernel: int, dtype: Any, *, stride: int = 1,
               padding: Sequence[tuple[int, int]]):
    self.stride = stride
    self.padding = tuple(tuple(p) for p in padding)
    self.kernel = nnx.Param(jnp.zeros((kernel, kernel, cin, cout), dtype))
    self.bias = nnx.Param(jnp.zeros((cout,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, (self.stride, self.stride),
                                     self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...]


class Linear(nnx.Module):
  """torch ``nn.Linear``; the kernel is (in, out), as ``nnx.Linear`` keeps it (zeros until a
  checkpoint fills it, see ``Conv2d``)."""

  def __init__(self, din: int, dout: int, dtype: Any, *, bias: bool = True):
    self.kernel = nnx.Param(jnp.zeros((din, dout), dtype))
    self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    y = jnp.dot(x.astype(kernel.dtype), kernel)
    return y + self.bias[...] if self.bias is not None else y


def conv(cin: int, cout: int, kernel: int, dtype: Any, *,
         stride: int = 1, padding: Sequence[tuple[int, int]] | None = None) -> Conv2d:
  """A ``Conv2d``: symmetric padding ``kernel // 2`` unless given (torch's ``padding=k // 2``)."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return Conv2d(cin, cout, kernel, dtype, stride=stride, padding=padding)


def linear(din: int, dout: int, dtype: Any, *,
           bias: bool = True) -> Linear:
  """A ``Linear`` (torch ``nn.Linear``)."""
  return Linear(din, dout, dtype, bias=bias)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """``nn.LayerNorm(elementwise_affine=False)`` over the last axis, in float32."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class GroupNorm(nnx.Module):
  """torch ``nn.GroupNorm(affine=True)`` on NHWC (or (batch, ..., channels)) input.

  Channel ``c`` belongs to group ``c // (channels / groups)``, as in torch; statistics are over
  every spatial position and the group's channels, with the biased variance.
  """

  def __init__(self, groups: int, channels: int, eps: float, dtype: Any):
    if channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
    self.groups = groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,), dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
    mean = xf.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """torch ``nn.LayerNorm(elementwise_affine=True)`` over the last axis, in float32."""

  def __init__(self, dim: int, eps: float, dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x.astype(jnp.float32), self.eps)
    return (y * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       downscale_freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """diffusers' ``get_timestep_embedding``: (batch,) timesteps → (batch, dim) sinusoids, float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  exponent = exponent / (half - downscale_freq_shift)
  emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """diffusers' ``TimestepEmbedding`` (SiLU, no condition projection): linear_1, SiLU, linear_2."""

  def __init__(self, din: int, dout: int, dtype: Any):
    self.linear_1 = linear(din, dout, dtype)
    self.linear_2 = linear(dout, dout, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  """diffusers' ``ResnetBlock2D`` (``time_embedding_norm="default"``, SiLU).

  GroupNorm, SiLU, 3x3 conv, + projected time embedding, GroupNorm, SiLU, 3x3 conv; the input,
  through a 1x1 conv when the channel count changes, is added and the sum divided by
  ``output_scale_factor``. Dropout is training-only.
  """

  def __init__(self, cin: int, cout: int, *, temb_channels: int | None, groups: int, eps: float,
               output_scale_factor: float = 1.0, dtype: Any):
    self.norm1 = GroupNorm(groups, cin, eps, dtype)
    self.conv1 = conv(cin, cout, 3, dtype)
    self.time_emb_proj = (linear(temb_channels, cout, dtype)
                          if temb_channels is not None else None)
    self.norm2 = GroupNorm(groups, cout, eps, dtype)
    self.conv2 = conv(cout, cout, 3, dtype)
    self.conv_shortcut = conv(cin, cout, 1, dtype) if cin != cout else None
    self.output_scale_factor = output_scale_factor

  def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
    h = self.conv1(silu(self.norm1(x)))
    if self.time_emb_proj is not None and temb is not None:
      h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
    h = self.conv2(silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
  """diffusers' ``Downsample2D(use_conv=True)``: a stride-2 3x3 conv.

  ``padding=1`` pads one pixel on every side (the UNets); ``padding=0`` pads only the bottom and
  right (the VAE encoder, which ``F.pad(x, (0, 1, 0, 1))`` before an unpadded conv).
  """

  def __init__(self, channels: int, *, padding: int, dtype: Any):
    pads = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
    if padding not in (0, 1):
      raise ValueError(f"Downsample2D padding {padding} is not 0 or 1")
    self.conv = conv(channels, channels, 3, dtype, stride=2, padding=pads)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """torch ``F.interpolate(mode="nearest")`` of NHWC ``x``: by 2, or to ``size`` (rows, cols).

  torch picks source index ``min(floor(dst * (in / out)), in - 1)`` with a float32 scale.
  """
  _, h, w, _ = x.shape
  out_h, out_w = (2 * h, 2 * w) if size is None else size
  if (out_h, out_w) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

  def index(n_in: int, n_out: int) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, n_in - 1)

  return x[:, index(h, out_h)][:, :, index(w, out_w)]


class Upsample2D(nnx.Module):
  """diffusers' ``Upsample2D(use_conv=True)``: nearest-neighbour upsampling, then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype: Any):
    self.conv = conv(channels, channels, 3, dtype)

  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    return self.conv(upsample_nearest(x, size))


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         attention_impl: str) -> jax.Array:
  """``F.scaled_dot_product_attention`` of (b, t, heads, d) queries over (b, s, heads, d) keys
  and values: softmax(q k / sqrt(d)) v per head, (b, t, heads, d); ``attention_impl`` picks the
  einsum (scores in float32) or ``jax.nn.dot_product_attention`` (``models.attention``)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  if attention_lib.resolve(attention_impl) == "fused":
    return attention_lib.fused(q, k, v, scale=scale)
  scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


class Attention(nnx.Module):
  """diffusers' ``Attention`` with ``AttnProcessor2_0``, on (batch, tokens, dim) inputs.

  q from the tokens, k and v from ``context`` (the tokens themselves when None); softmax of
  ``q k / sqrt(head_dim)`` per head; ``to_out`` projects back. ``group_norm`` (the VAE's spatial
  attention) normalises the tokens first. ``attention_impl`` picks the einsum or
  ``jax.nn.dot_product_attention`` (``models.attention``); both give the same result.
  """

  def __init__(self, query_dim: int, *, heads: int, head_dim: int, context_dim: int | None = None,
               qkv_bias: bool = False, out_bias: bool = True,
               group_norm: tuple[int, float] | None = None, dtype: Any):
    inner = heads * head_dim
    context_dim = query_dim if context_dim is None else context_dim
    self.heads = heads
    self.head_dim = head_dim
    self.group_norm = (GroupNorm(group_norm[0], query_dim, group_norm[1], dtype)
                       if group_norm is not None else None)
    self.to_q = linear(query_dim, inner, dtype, bias=qkv_bias)
    self.to_k = linear(context_dim, inner, dtype, bias=qkv_bias)
    self.to_v = linear(context_dim, inner, dtype, bias=qkv_bias)
    self.to_out = linear(inner, query_dim, dtype, bias=out_bias)
    self.attention_impl = "auto"

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    if self.group_norm is not None:
      x = self.group_norm(x)
    context = x if context is None else context
    b, t, _ = x.shape
    s = context.shape[1]
    q = self.to_q(x).reshape(b, t, self.heads, self.head_dim)
    k = self.to_k(context).reshape(b, s, self.heads, self.head_dim)
    v = self.to_v(context).reshape(b, s, self.heads, self.head_dim)
    out = multi_head_attention(q, k, v, self.attention_impl)
    return self.to_out(out.reshape(b, t, self.heads * self.head_dim))


class FeedForward(nnx.Module):
  """diffusers' ``FeedForward`` (mult 4): ``proj_in`` is ``net.0.proj``, ``proj_out`` ``net.2``.

  ``geglu``: ``proj_in`` doubles the width, value * GELU(gate) (exact GELU); ``gelu`` /
  ``gelu-approximate``: GELU (exact / tanh) of ``proj_in``'s output.
  """

  def __init__(self, dim: int, *, activation: str, dtype: Any,
               inner_dim: int | None = None):
    if activation not in FEED_FORWARD_ACTIVATIONS:
      raise ValueError(f"feed-forward activation {activation!r} is not one of "
                       f"{', '.join(FEED_FORWARD_ACTIVATIONS)}")
    inner = 4 * dim if inner_dim is None else inner_dim
    self.activation = activation
    self.proj_in = linear(dim, 2 * inner if activation == "geglu" else inner, dtype)
    self.proj_out = linear(inner, dim, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.proj_in(x)
    if self.activation == "geglu":
      value, gate = jnp.split(h, 2, axis=-1)
      h = value * jax.nn.gelu(gate, approximate=False)
    else:
      h = jax.nn.gelu(h, approximate=self.activation == "gelu-approximate")
    return self.proj_out(h)


class BasicTransformerBlock(nnx.Module):
  """diffusers' ``BasicTransformerBlock`` with ``norm_type="layer_norm"`` (the SD UNets').

  x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).
  """

  def __init__(self, dim: int, *, heads: int, head_dim: int, context_dim: int, eps: float,
               activation: str, dtype: Any):
    self.norm1 = LayerNorm(dim, eps, dtype)
    self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, dtype=dtype)
    self.norm2 = LayerNorm(dim, eps, dtype)
    self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim,
                           dtype=dtype)
    self.norm3 = LayerNorm(dim, eps, dtype)
    self.ff = FeedForward(dim, activation=activation, dtype=dtype)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """diffusers' ``Transformer2DModel`` on a continuous NHWC map, as the SD UNets use it.

  GroupNorm (eps 1e-6), ``proj_in`` (a 1x1 conv, or a linear layer with
  ``use_linear_projection``: SD 2.x, SDXL), the transformer blocks over the h*w tokens,
  ``proj_out``, plus the input.
  """

  def __init__(self, channels: int, *, heads: int, num_layers: int, context_dim: int,
               groups: int, use_linear_projection: bool, dtype: Any):
    head_dim = channels // heads
    inner = heads * head_dim
    self.use_linear_projection = use_linear_projection
    self.norm = GroupNorm(groups, channels, 1e-6, dtype)
    if use_linear_projection:
      self.proj_in = linear(channels, inner, dtype)
      self.proj_out = linear(inner, channels, dtype)
    else:
      self.proj_in = conv(channels, inner, 1, dtype)
      self.proj_out = conv(inner, channels, 1, dtype)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads=heads, head_dim=head_dim, context_dim=context_dim,
                              eps=1e-5, activation="geglu", dtype=dtype)
        for _ in range(num_layers)])

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = self.norm(x)
    if self.use_linear_projection:
      y = self.proj_in(y.reshape(b, h * w, c))
    else:
      y = self.proj_in(y)
      y = y.reshape(b, h * w, y.shape[-1])
    for block in self.transformer_blocks:
      y = block(y, context)
    if self.use_linear_projection:
      y = self.proj_out(y).reshape(b, h, w, c)
    else:
      y = self.proj_out(y.reshape(b, h, w, y.shape[-1]))
    return y + x
