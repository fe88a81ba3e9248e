"""diffusers' ``DiTTransformer2DModel`` (Peebles & Xie's DiT) in Flax NNX, for features.

A class-conditional latent transformer: the latent is cut into p x p patches (a stride-p conv),
fixed 2-D sin-cos position embeddings are added, and every block is adaLN-Zero: the timestep
(sinusoids through an MLP) plus a learned class embedding, through SiLU and a linear layer, give
the shift, scale and gate of the attention and MLP branches. ``DiT.__call__`` returns every
block's tokens as an NHWC grid of patches; the final adaLN and unpatchify projection (the noise
prediction) are not built.

The class label is an input; feature extraction passes the *null* class (index
``num_embeds_ada_norm``, the label classifier-free guidance trains with dropped labels), the
unconditional model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vlmsel_jax.models.checkpoint import UnsupportedModelError
from vlmsel_jax.models.diffusion import layers

# Hub DiT checkpoints were saved as ``Transformer2DModel`` with a patch size; diffusers loads them
# as ``DiTTransformer2DModel``.
SUPPORTED_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# The sinusoid width of the adaLN timestep embedding (diffusers' CombinedTimestepLabelEmbeddings).
TIMESTEP_CHANNELS = 256


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """A ``DiTTransformer2DModel`` config.

  Attributes:
    num_attention_heads: Heads per block.
    attention_head_dim: Width of each head; the model width is heads * head width.
    in_channels: Latent channels.
    num_layers: Transformer blocks.
    patch_size: Latent pixels per patch side.
    sample_size: Latent side the model was trained at (sets the position-embedding scale).
    num_embeds_ada_norm: Number of classes; the null class is this index.
    activation_fn: The MLP's GELU ("gelu-approximate": tanh, as DiT; or "gelu").
    attention_bias: Biases on q, k, v.
    norm_eps: Epsilon of the MLP branch's LayerNorm.
  """

  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  num_layers: int = 28
  patch_size: int = 2
  sample_size: int = 32
  num_embeds_ada_norm: int = 1000
  activation_fn: str = "gelu-approximate"
  attention_bias: bool = True
  norm_eps: float = 1e-5

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def null_class(self) -> int:
    """The label of the unconditional (dropped-label) embedding."""
    return self.num_embeds_ada_norm

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], source: str = "transformer") -> DiTConfig:
    """Reads a ``DiTTransformer2DModel`` ``config.json`` dict.

    Raises:
      UnsupportedModelError: another class or a setting this port does not implement.
    """
    name = config.get("_class_name", "DiTTransformer2DModel")
    problems = []
    if name not in SUPPORTED_CLASSES:
      problems.append(f"class {name!r}")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
      problems.append(f"norm_type {config.get('norm_type')!r} (only ada_norm_zero)")
    if config.get("norm_elementwise_affine", False):
      problems.append("norm_elementwise_affine=True")
    if config.get("patch_size") is None:
      problems.append("no patch_size (not a DiT)")
    if config.get("num_embeds_ada_norm") is None:
      problems.append("no num_embeds_ada_norm (no class conditioning)")
    act = config.get("activation_fn", "gelu-approximate")
    if act not in ("gelu", "gelu-approximate"):
      problems.append(f"activation_fn {act!r}")
    out = config.get("out_channels")
    if config.get("cross_attention_dim") is not None:
      problems.append("cross_attention_dim (a text-conditioned transformer, not a DiT)")
    if problems:
      raise UnsupportedModelError(f"{source}: unsupported DiT setting(s): {'; '.join(problems)}")
    del out  # The output channels only shape the skipped noise-prediction head.
    return cls(num_attention_heads=int(config.get("num_attention_heads", 16)),
               attention_head_dim=int(config.get("attention_head_dim", 72)),
               in_channels=int(config.get("in_channels", 4)),
               num_layers=int(config.get("num_layers", 28)),
               patch_size=int(config["patch_size"]),
               sample_size=int(config.get("sample_size", 32)),
               num_embeds_ada_norm=int(config["num_embeds_ada_norm"]),
               activation_fn=act,
               attention_bias=bool(config.get("attention_bias", True)),
               norm_eps=float(config.get("norm_eps", 1e-5)))


def sincos_position_embedding(dim: int, rows: int, cols: int, base_size: int) -> np.ndarray:
  """diffusers' ``get_2d_sincos_pos_embed`` for a rows x cols grid: (rows * cols, dim) float32.

  Token ``r * cols + c`` gets the sinusoids of its column coordinate in the first half of the
  channels and of its row coordinate in the second; coordinates are scaled so the grid spans
  ``base_size`` (the training grid) whatever its size. Computed in float64, as diffusers does.
  """
  if dim % 4:
    raise ValueError(f"the position embedding width {dim} must be a multiple of 4")
  col = np.arange(cols, dtype=np.float32) / np.float32(cols / base_size)
  row = np.arange(rows, dtype=np.float32) / np.float32(rows / base_size)
  grid_c, grid_r = np.meshgrid(col, row, indexing="xy")  # each (rows, cols)

  def one_axis(pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 4, dtype=np.float64) / (dim / 4.0)
    omega = 1.0 / 10000 ** omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(grid_c), one_axis(grid_r)], axis=1).astype(np.float32)


class PatchEmbed(nnx.Module):
  """A stride-p p x p conv over the latent, flattened row-major, plus sin-cos positions."""

  def __init__(self, config: DiTConfig, *, dtype: Any):
    p = config.patch_size
    self.patch_size = p
    self.base_size = config.sample_size // p
    self.proj = layers.conv(config.in_channels, config.hidden_size, p, dtype, stride=p,
                            padding=((0, 0), (0, 0)))

  def __call__(self, latents: jax.Array) -> jax.Array:
    x = self.proj(latents)
    b, rows, cols, d = x.shape
    pos = sincos_position_embedding(d, rows, cols, self.base_size)
    return x.reshape(b, rows * cols, d) + jnp.asarray(pos, x.dtype)


class AdaLayerNormZero(nnx.Module):
  """adaLN-Zero: conditioning = MLP(timestep sinusoids) + class embedding; SiLU, a linear layer
  → shift, scale, gate of attention and MLP; the tokens are LayerNormed (no affine, eps 1e-6)."""

  def __init__(self, dim: int, num_classes: int, *, dtype: Any):
    self.timestep_embedder = layers.TimestepEmbedding(TIMESTEP_CHANNELS, dim, dtype)
    # One more row than classes: the null class of classifier-free guidance.
    self.class_embedding = nnx.Param(jnp.zeros((num_classes + 1, dim), dtype))
    self.linear = layers.linear(dim, 6 * dim, dtype)

  def conditioning(self, timesteps: jax.Array, labels: jax.Array) -> jax.Array:
    t = layers.timestep_embedding(timesteps, TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                                  downscale_freq_shift=1)
    return (self.timestep_embedder(t.astype(self.class_embedding[...].dtype))
            + self.class_embedding[...][labels])

  def __call__(self, x: jax.Array, timesteps: jax.Array, labels: jax.Array):
    emb = self.linear(layers.silu(self.conditioning(timesteps, labels)))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(emb, 6, axis=-1)
    x = layers.layer_norm(x, 1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class DiTBlock(nnx.Module):
  """``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``: gated attention and MLP."""

  def __init__(self, config: DiTConfig, *, dtype: Any):
    c = config
    dim = c.hidden_size
    self.norm_eps = c.norm_eps
    self.norm1 = AdaLayerNormZero(dim, c.num_embeds_ada_norm, dtype=dtype)
    self.attn1 = layers.Attention(dim, heads=c.num_attention_heads,
                                  head_dim=c.attention_head_dim, qkv_bias=c.attention_bias,
                                  dtype=dtype)
    self.ff = layers.FeedForward(dim, activation=c.activation_fn, dtype=dtype)

  def __call__(self, x: jax.Array, timesteps: jax.Array, labels: jax.Array) -> jax.Array:
    h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, timesteps, labels)
    x = x + gate_msa[:, None] * self.attn1(h)
    h = layers.layer_norm(x, self.norm_eps) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return x + gate_mlp[:, None] * self.ff(h)


@struct.dataclass
class DiTOutput:
  """What ``DiT.__call__`` returns (a pytree).

  Attributes:
    hidden_states: Every block's tokens as (batch, rows, cols, hidden) patch grids, block 0
      first.
  """

  hidden_states: tuple[jax.Array, ...]


class DiT(nnx.Module):
  """A ``DiTTransformer2DModel`` up to its last transformer block (NHWC latents)."""

  def __init__(self, config: DiTConfig, *, dtype: Any = jnp.float32):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.pos_embed = PatchEmbed(config, dtype=dtype)
    self.transformer_blocks = nnx.List([DiTBlock(config, dtype=dtype)
                                        for _ in range(config.num_layers)])

  def __call__(self, latents: jax.Array, timesteps: jax.Array,
               labels: jax.Array | None = None) -> DiTOutput:
    """Runs the blocks on NHWC latents.

    Args:
      latents: (batch, h, w, in_channels) noised latents.
      timesteps: A scalar or (batch,) diffusion timesteps.
      labels: (batch,) class labels; None: the null class for every image.

    Returns:
      A ``DiTOutput`` with every block's patch grid.
    """
    b, h, w, _ = latents.shape
    p = self.config.patch_size
    rows, cols = h // p, w // p
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    if labels is None:
      labels = jnp.full((b,), self.config.null_class, jnp.int32)
    x = self.pos_embed(latents.astype(self.dtype))
    hidden = []
    for block in self.transformer_blocks:
      x = block(x, t, labels)
      hidden.append(x.reshape(b, rows, cols, x.shape[-1]))
    return DiTOutput(hidden_states=tuple(hidden))
