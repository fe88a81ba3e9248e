"""diffusers' ``SD3Transformer2DModel`` (Stable Diffusion 3's MMDiT) in Flax NNX, for features.

A text-conditioned latent transformer with two token streams: the latent is cut into p x p
patches (a stride-p conv) plus a sin-cos position table, the text tokens are projected by
``context_embedder``; every ``JointTransformerBlock`` modulates both streams with adaLN-Zero
from one conditioning vector (timestep sinusoids through an MLP plus the projected pooled text
embedding), lets image and text tokens attend jointly over their concatenation, and runs a
separate gated MLP per stream. The last block is ``context_pre_only``: its text stream is only
normalised (``AdaLayerNormContinuous``) to give keys and values and is not carried on.

SD 3.5 adds RMS normalisation of every head's queries and keys (``qk_norm="rms_norm"``); SD 3.5
Medium's first blocks also run a second, image-only self-attention (``dual_attention_layers``,
modulated by three more adaLN outputs). Both are built.

``MMDiT.__call__`` returns every block's image tokens as an NHWC grid of patches; the final
adaLN and unpatchify projection (the velocity prediction) are not built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vlmsel_jax.models.checkpoint import UnsupportedModelError
from vlmsel_jax.models.diffusion import dit as dit_lib
from vlmsel_jax.models.diffusion import layers

SUPPORTED_CLASSES = ("SD3Transformer2DModel",)
QK_NORMS = (None, "rms_norm")
# The sinusoid width of the timestep embedding (diffusers' CombinedTimestepTextProjEmbeddings).
TIMESTEP_CHANNELS = 256
# Epsilon of every LayerNorm and RMSNorm in the blocks (diffusers hard-codes 1e-6).
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """An ``SD3Transformer2DModel`` config.

  Attributes:
    sample_size: Latent side the model was trained at (sets the position table's scale).
    patch_size: Latent pixels per patch side.
    in_channels: Latent channels.
    num_layers: Joint transformer blocks.
    attention_head_dim: Width of each head; the model width is heads * head width.
    num_attention_heads: Heads per attention.
    joint_attention_dim: Width of the text encoders' token embeddings.
    caption_projection_dim: Width the text tokens are projected to (the model width).
    pooled_projection_dim: Width of the pooled text embedding.
    pos_embed_max_size: Side of the stored position table, centre-cropped to the latent grid
      (None: a table computed for the grid, as a DiT does).
    dual_attention_layers: Blocks with the second, image-only self-attention (SD 3.5 Medium).
    qk_norm: None, or "rms_norm": RMSNorm of each head's queries and keys (SD 3.5).
  """

  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  pos_embed_max_size: int | None = 96
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], source: str = "transformer") -> MMDiTConfig:
    """Reads an ``SD3Transformer2DModel`` ``config.json`` dict.

    Raises:
      UnsupportedModelError: another class or a setting this port does not implement (one line
        naming ``source``, the config's folder).
    """
    name = config.get("_class_name", "SD3Transformer2DModel")
    heads = int(config.get("num_attention_heads", 18))
    head_dim = int(config.get("attention_head_dim", 64))
    caption = int(config.get("caption_projection_dim", 1152))
    qk_norm = config.get("qk_norm")
    problems = []
    if name not in SUPPORTED_CLASSES:
      problems.append(f"class {name!r} (only {', '.join(SUPPORTED_CLASSES)})")
    if qk_norm not in QK_NORMS:
      problems.append(f"qk_norm {qk_norm!r} (only None or 'rms_norm')")
    if caption != heads * head_dim:
      # The joint attention projects the text tokens with (model width)-input layers.
      problems.append(f"caption_projection_dim {caption} != num_attention_heads * "
                      f"attention_head_dim {heads * head_dim}")
    if problems:
      raise UnsupportedModelError(f"{source}: unsupported SD3 transformer setting(s): "
                                  f"{'; '.join(problems)}")
    max_size = config.get("pos_embed_max_size", 96)
    return cls(sample_size=int(config.get("sample_size", 128)),
               patch_size=int(config.get("patch_size", 2)),
               in_channels=int(config.get("in_channels", 16)),
               num_layers=int(config.get("num_layers", 18)),
               attention_head_dim=head_dim,
               num_attention_heads=heads,
               joint_attention_dim=int(config.get("joint_attention_dim", 4096)),
               caption_projection_dim=caption,
               pooled_projection_dim=int(config.get("pooled_projection_dim", 2048)),
               pos_embed_max_size=None if max_size is None else int(max_size),
               dual_attention_layers=tuple(int(i) for i in
                                           config.get("dual_attention_layers") or ()),
               qk_norm=qk_norm)


class PositionTable(nnx.Variable):
  """A fixed position-embedding table read from the checkpoint (a torch buffer): never trained."""


class PatchEmbed(nnx.Module):
  """diffusers' ``PatchEmbed`` as SD3 builds it: a stride-p p x p conv, flattened row-major, plus
  the centre of the stored (max x max) sin-cos table, or without ``pos_embed_max_size`` the
  table ``get_2d_sincos_pos_embed`` computes for the grid."""

  def __init__(self, config: MMDiTConfig, *, dtype: Any):
    p = config.patch_size
    d = config.hidden_size
    self.patch_size = p
    self.base_size = config.sample_size // p
    self.max_size = config.pos_embed_max_size
    self.proj = layers.conv(config.in_channels, d, p, dtype, stride=p, padding=((0, 0), (0, 0)))
    self.pos_embed = (PositionTable(jnp.zeros((1, self.max_size ** 2, d), dtype))
                      if self.max_size is not None else None)

  def positions(self, rows: int, cols: int, dim: int) -> jax.Array:
    """(rows * cols, dim) position embeddings of a rows x cols patch grid."""
    if self.pos_embed is None:
      return jnp.asarray(dit_lib.sincos_position_embedding(dim, rows, cols, self.base_size))
    m = self.max_size
    if rows > m or cols > m:
      raise ValueError(f"a {rows} x {cols} patch grid exceeds the position table's "
                       f"{m} x {m} (pos_embed_max_size)")
    top, left = (m - rows) // 2, (m - cols) // 2
    table = self.pos_embed[...].reshape(m, m, dim)
    return table[top:top + rows, left:left + cols].reshape(rows * cols, dim)

  def __call__(self, latents: jax.Array) -> jax.Array:
    x = self.proj(latents)
    b, rows, cols, d = x.shape
    return x.reshape(b, rows * cols, d) + self.positions(rows, cols, d).astype(x.dtype)


class TimeTextEmbedding(nnx.Module):
  """``CombinedTimestepTextProjEmbeddings``: MLP(timestep sinusoids) + MLP(pooled text), the
  conditioning vector every adaLN reads."""

  def __init__(self, dim: int, pooled_dim: int, *, dtype: Any):
    self.timestep_embedder = layers.TimestepEmbedding(TIMESTEP_CHANNELS, dim, dtype)
    # PixArtAlphaTextProjection(act_fn="silu"): linear_1, SiLU, linear_2, as TimestepEmbedding.
    self.text_embedder = layers.TimestepEmbedding(pooled_dim, dim, dtype)

  def __call__(self, timesteps: jax.Array, pooled_text: jax.Array) -> jax.Array:
    t = layers.timestep_embedding(timesteps, TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                                  downscale_freq_shift=0)
    dtype = self.timestep_embedder.linear_1.kernel[...].dtype
    return self.timestep_embedder(t.astype(dtype)) + self.text_embedder(pooled_text.astype(dtype))


class RMSNorm(nnx.Module):
  """diffusers' ``RMSNorm`` with a weight, over the last axis: statistics in float32."""

  def __init__(self, dim: int, eps: float, dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class AdaLayerNormZero(nnx.Module):
  """adaLN-Zero from a given conditioning: SiLU, a linear layer → ``chunks`` modulation vectors
  (6: shift, scale, gate of attention, then of the MLP; SD 3.5's ``SD35AdaLayerNormZeroX``: 9,
  the last three for the second attention). Returns the modulated, LayerNormed tokens (and the
  second attention's input), with the gates and the MLP's shift and scale."""

  def __init__(self, dim: int, *, chunks: int, dtype: Any):
    self.chunks = chunks
    self.linear = layers.linear(dim, chunks * dim, dtype)

  def __call__(self, x: jax.Array, conditioning: jax.Array) -> tuple[jax.Array, ...]:
    emb = self.linear(layers.silu(conditioning))[:, None]
    parts = jnp.split(emb, self.chunks, axis=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = parts[:6]
    normed = layers.layer_norm(x, NORM_EPS)
    out = (normed * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    if self.chunks == 9:
      shift_msa2, scale_msa2, gate_msa2 = parts[6:]
      out += (normed * (1 + scale_msa2) + shift_msa2, gate_msa2)
    return out


class AdaLayerNormContinuous(nnx.Module):
  """``AdaLayerNormContinuous`` (no affine, eps 1e-6): SiLU, a linear layer → scale, shift (in
  that order); LayerNorm(x) * (1 + scale) + shift."""

  def __init__(self, dim: int, *, dtype: Any):
    self.linear = layers.linear(dim, 2 * dim, dtype)

  def __call__(self, x: jax.Array, conditioning: jax.Array) -> jax.Array:
    scale, shift = jnp.split(self.linear(layers.silu(conditioning))[:, None], 2, axis=-1)
    return layers.layer_norm(x, NORM_EPS) * (1 + scale) + shift


class JointAttention(nnx.Module):
  """diffusers' ``Attention`` with ``JointAttnProcessor2_0``.

  Image tokens through ``to_q`` / ``to_k`` / ``to_v``, text tokens (when given) through
  ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj``, each head's queries and keys optionally
  RMS-normalised (``norm_q`` / ``norm_k``, ``norm_added_q`` / ``norm_added_k``); one softmax
  attention over the image tokens followed by the text tokens; the image part through
  ``to_out``, the text part through ``to_add_out`` (absent in a ``context_pre_only`` block,
  whose text output is dropped: None).
  """

  def __init__(self, dim: int, *, heads: int, head_dim: int, joint: bool, context_out: bool,
               qk_norm: str | None, dtype: Any):
    inner = heads * head_dim
    self.heads = heads
    self.head_dim = head_dim
    self.to_q = layers.linear(dim, inner, dtype)
    self.to_k = layers.linear(dim, inner, dtype)
    self.to_v = layers.linear(dim, inner, dtype)
    self.to_out = layers.linear(inner, dim, dtype)
    norm = qk_norm == "rms_norm"
    self.norm_q = RMSNorm(head_dim, NORM_EPS, dtype) if norm else None
    self.norm_k = RMSNorm(head_dim, NORM_EPS, dtype) if norm else None
    self.add_q_proj = layers.linear(dim, inner, dtype) if joint else None
    self.add_k_proj = layers.linear(dim, inner, dtype) if joint else None
    self.add_v_proj = layers.linear(dim, inner, dtype) if joint else None
    self.norm_added_q = RMSNorm(head_dim, NORM_EPS, dtype) if norm and joint else None
    self.norm_added_k = RMSNorm(head_dim, NORM_EPS, dtype) if norm and joint else None
    self.to_add_out = layers.linear(inner, dim, dtype) if joint and context_out else None
    self.attention_impl = "auto"

  def _heads(self, x: jax.Array, proj: layers.Linear, norm: RMSNorm | None) -> jax.Array:
    b, t, _ = x.shape
    y = proj(x).reshape(b, t, self.heads, self.head_dim)
    return norm(y) if norm is not None else y

  def __call__(self, x: jax.Array, context: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    q = self._heads(x, self.to_q, self.norm_q)
    k = self._heads(x, self.to_k, self.norm_k)
    v = self._heads(x, self.to_v, None)
    if context is not None:
      q = jnp.concatenate([q, self._heads(context, self.add_q_proj, self.norm_added_q)], axis=1)
      k = jnp.concatenate([k, self._heads(context, self.add_k_proj, self.norm_added_k)], axis=1)
      v = jnp.concatenate([v, self._heads(context, self.add_v_proj, None)], axis=1)
    out = layers.multi_head_attention(q, k, v, self.attention_impl)
    b, n = x.shape[:2]
    out = out.reshape(b, out.shape[1], self.heads * self.head_dim)
    image, text = out[:, :n], out[:, n:]
    text_out = self.to_add_out(text) if self.to_add_out is not None else None
    return self.to_out(image), text_out


class JointTransformerBlock(nnx.Module):
  """diffusers' ``JointTransformerBlock``: adaLN-Zero on both streams, joint attention, a gated
  GELU (tanh) MLP per stream; ``context_pre_only`` (the last block) ends the text stream;
  ``dual_attention`` adds the gated image-only self-attention ``attn2`` after the joint one."""

  def __init__(self, config: MMDiTConfig, *, context_pre_only: bool, dual_attention: bool,
               dtype: Any):
    c = config
    dim = c.hidden_size
    self.context_pre_only = context_pre_only
    self.norm1 = AdaLayerNormZero(dim, chunks=9 if dual_attention else 6, dtype=dtype)
    self.norm1_context = (AdaLayerNormContinuous(dim, dtype=dtype) if context_pre_only
                          else AdaLayerNormZero(dim, chunks=6, dtype=dtype))
    self.attn = JointAttention(dim, heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                               joint=True, context_out=not context_pre_only, qk_norm=c.qk_norm,
                               dtype=dtype)
    self.attn2 = (JointAttention(dim, heads=c.num_attention_heads,
                                 head_dim=c.attention_head_dim, joint=False, context_out=False,
                                 qk_norm=c.qk_norm, dtype=dtype)
                  if dual_attention else None)
    self.ff = layers.FeedForward(dim, activation="gelu-approximate", dtype=dtype)
    self.ff_context = (layers.FeedForward(dim, activation="gelu-approximate", dtype=dtype)
                       if not context_pre_only else None)

  def __call__(self, x: jax.Array, context: jax.Array, conditioning: jax.Array
               ) -> tuple[jax.Array, jax.Array | None]:
    """(image tokens, text tokens; None after a ``context_pre_only`` block)."""
    h, gate_msa, shift_mlp, scale_mlp, gate_mlp, *second = self.norm1(x, conditioning)
    if self.context_pre_only:
      c_h = self.norm1_context(context, conditioning)
    else:
      c_h, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context,
                                                                                 conditioning)
    attn_out, context_attn_out = self.attn(h, c_h)
    x = x + gate_msa * attn_out
    if self.attn2 is not None:
      h2, gate_msa2 = second
      x = x + gate_msa2 * self.attn2(h2)[0]
    h = layers.layer_norm(x, NORM_EPS) * (1 + scale_mlp) + shift_mlp
    x = x + gate_mlp * self.ff(h)
    if self.context_pre_only:
      return x, None
    context = context + c_gate_msa * context_attn_out
    c_h = layers.layer_norm(context, NORM_EPS) * (1 + c_scale_mlp) + c_shift_mlp
    return x, context + c_gate_mlp * self.ff_context(c_h)


@struct.dataclass
class MMDiTOutput:
  """What ``MMDiT.__call__`` returns (a pytree).

  Attributes:
    hidden_states: Every block's image tokens as (batch, rows, cols, hidden) patch grids,
      block 0 first.
  """

  hidden_states: tuple[jax.Array, ...]


class MMDiT(nnx.Module):
  """An ``SD3Transformer2DModel`` up to its last joint block (NHWC latents)."""

  def __init__(self, config: MMDiTConfig, *, dtype: Any = jnp.float32):
    c = config
    self.config = c
    self.dtype = jnp.dtype(dtype)
    self.pos_embed = PatchEmbed(c, dtype=dtype)
    self.time_text_embed = TimeTextEmbedding(c.hidden_size, c.pooled_projection_dim, dtype=dtype)
    self.context_embedder = layers.linear(c.joint_attention_dim, c.caption_projection_dim, dtype)
    self.transformer_blocks = nnx.List([
        JointTransformerBlock(c, context_pre_only=i == c.num_layers - 1,
                              dual_attention=i in c.dual_attention_layers, dtype=dtype)
        for i in range(c.num_layers)])

  def __call__(self, latents: jax.Array, timesteps: jax.Array, context: jax.Array,
               pooled_text: jax.Array) -> MMDiTOutput:
    """Runs the blocks on NHWC latents.

    Args:
      latents: (batch, h, w, in_channels) noised latents.
      timesteps: A scalar or (batch,) model timesteps (flow matching: sigma * 1000).
      context: (batch or 1, tokens, joint_attention_dim) text-encoder token embeddings.
      pooled_text: (batch or 1, pooled_projection_dim) pooled text embedding.

    Returns:
      An ``MMDiTOutput`` with every block's image-token patch grid.
    """
    b, h, w, _ = latents.shape
    p = self.config.patch_size
    rows, cols = h // p, w // p
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    pooled_text = jnp.broadcast_to(pooled_text, (b, pooled_text.shape[-1]))
    context = jnp.broadcast_to(context, (b, *context.shape[1:]))
    x = self.pos_embed(latents.astype(self.dtype))
    conditioning = self.time_text_embed(t, pooled_text)
    text = self.context_embedder(context)
    hidden = []
    for block in self.transformer_blocks:
      x, text = block(x, text, conditioning)
      hidden.append(x.reshape(b, rows, cols, x.shape[-1]))
    return MMDiTOutput(hidden_states=tuple(hidden))
