"""InternViT, the vision tower of transformers' InternVL (``InternVLVisionModel``), in Flax NNX.

An InternViT is a ViT with a CLS token, learned absolute position embeddings and pre-norm encoder
layers whose two branches are scaled by learned per-channel layer scales (``lambda_1`` /
``lambda_2``). Per config: LayerNorm or RMSNorm in the layers (``norm_type``), an RMSNorm on the
full-width queries and keys (``use_qk_norm``, InternViT-6B), biases on q/k/v
(``attention_bias``), and a final LayerNorm only when ``use_mean_pooling`` is off.

The modules reuse ``vit``'s: ``InternVit`` is a ``vit.Vit`` (patch embedding as one matmul, the
vision-tower protocol ``patch_grid``, ``VitOutput``), its layer a ``vit.EncoderLayer`` (same
residual arithmetic with layer scales), its attention a ``vit.Attention`` with the q/k norms.
Images are NHWC; the numerics follow transformers' torch implementation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlmsel_jax.models import hf_config
from vlmsel_jax.models.vit import modeling as vit

# "internvl" is the full VLM (InternVLForConditionalGeneration); only its vision tower is built.
SUPPORTED_MODEL_TYPES = ("internvl_vision", "internvl")
SUPPORTED_ARCHITECTURES = ("InternVLVisionModel", "InternVLForConditionalGeneration",
                           "InternVLModel")
NORM_TYPES = ("layer_norm", "rms_norm")

# transformers' InternVLVisionConfig defaults: save_pretrained's sub-configs and hub files leave
# out fields equal to them.
_HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, attention_bias=False,
    use_qk_norm=False, intermediate_size=4096, hidden_act="gelu", norm_type="layer_norm",
    layer_norm_eps=1e-6, image_size=(448, 448), patch_size=(14, 14), num_channels=3,
    use_absolute_position_embeddings=True, use_mean_pooling=True)

# The q/k RMSNorms are built with InternVLVisionRMSNorm's default epsilon, not layer_norm_eps.
QK_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class InternVitConfig(vit.ClassTokenTowerConfig):
  """Architecture hyper-parameters of an InternViT: ``vit.TowerConfig``'s fields
  (``layer_norm_eps`` also of the layers' RMSNorms), plus:

  Attributes:
    hidden_act: MLP activation, a key of ``vit.ACTIVATIONS``.
    norm_type: "layer_norm" or "rms_norm", the norm before attention and before the MLP.
    attention_bias: Whether the q/k/v projections have biases.
    qk_norm: RMSNorm the (full-width) queries and keys before splitting heads.
    absolute_positions: Learned absolute position embeddings are added.
    mean_pooling: transformers' ``use_mean_pooling``: when off, a final LayerNorm makes
      ``last_hidden_state``.
    model_type: The transformers ``model_type`` the config came from.
  """

  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  image_size: tuple[int, int]
  patch_size: tuple[int, int]
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  norm_type: str = "layer_norm"
  attention_bias: bool = False
  qk_norm: bool = False
  absolute_positions: bool = True
  mean_pooling: bool = True
  model_type: str = "internvl_vision"
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    self._check_tower()
    self._check_heads_and_act()
    if self.norm_type not in NORM_TYPES:
      raise ValueError(f"norm_type {self.norm_type!r} is not one of {', '.join(NORM_TYPES)}")

  # What vit's shared modules (Attention, MLP, the LayerNorm helper) read from a config.
  @property
  def qkv_bias(self) -> bool:
    return self.attention_bias

  @property
  def pooler(self) -> bool:
    """transformers' InternVLVisionModel returns no ``pooler_output``."""
    return False

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> InternVitConfig:
    """Reads an ``internvl_vision`` config, or the ``vision_config`` of an ``internvl`` one.

    Raises:
      ValueError: another model_type.
    """
    c = dict(hf_config.read_config(config))
    model_type = c.get("model_type")
    if model_type == "internvl":
      c = dict(c.get("vision_config") or {})
      vision_type = c.get("model_type", "internvl_vision")
      if vision_type != "internvl_vision":
        raise ValueError(f"an internvl config needs an internvl_vision vision_config, got "
                         f"{vision_type!r}")
    elif model_type != "internvl_vision":
      raise ValueError(f"model_type {model_type!r} is not an InternViT; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    c = {**_HF_DEFAULTS, **c}
    return cls(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        image_size=vit._pair(c["image_size"]), patch_size=vit._pair(c["patch_size"]),  # pylint: disable=protected-access
        num_channels=c["num_channels"], layer_norm_eps=float(c["layer_norm_eps"]),
        hidden_act=c["hidden_act"], norm_type=c["norm_type"],
        attention_bias=bool(c["attention_bias"]), qk_norm=bool(c["use_qk_norm"]),
        absolute_positions=bool(c["use_absolute_position_embeddings"]),
        mean_pooling=bool(c["use_mean_pooling"]), model_type=model_type)


def _rms_norm(width: int, eps: float, dtype: Any, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """transformers' InternVLVisionRMSNorm: x * rsqrt(mean(x^2) + eps) * weight."""
  return nnx.RMSNorm(width, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype,
                     rngs=rngs)


def _layer_norm(config: InternVitConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
  """The norm ``norm_type`` names, over the hidden axis."""
  if config.norm_type == "rms_norm":
    return _rms_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)
  return vit._layer_norm(config, dtype, rngs)  # pylint: disable=protected-access


class InternVitAttention(vit.Attention):
  """``vit.Attention`` with InternViT's optional RMSNorm of the full-width queries and keys."""

  def __init__(self, config: InternVitConfig, *, dtype: Any, rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, rngs=rngs)
    d = config.hidden_size
    self.q_norm = _rms_norm(d, QK_NORM_EPS, dtype, rngs) if config.qk_norm else None
    self.k_norm = _rms_norm(d, QK_NORM_EPS, dtype, rngs) if config.qk_norm else None

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``vit.Attention``'s call (``mask``: None, or the (batch, tokens) visible keys)."""
    q, k = self.q_proj(x), self.k_proj(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    out = vit._attend(q, k, self.v_proj(x), self.num_heads, self.attention_impl, mask)  # pylint: disable=protected-access
    return self.o_proj(out)


class InternVitLayer(vit.EncoderLayer):
  """``vit.EncoderLayer`` (x + ls1 * attn(norm1(x)), then + ls2 * mlp(norm2(.))) with InternViT's
  norm type and attention, and its layer scales always present."""

  def __init__(self, config: InternVitConfig, *, dtype: Any, rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    # The parent's __init__ builds the ViT variants' pieces; this layer builds its own and keeps
    # the parent's forward pass.
    d = config.hidden_size
    self.norm1 = _layer_norm(config, dtype, rngs)
    self.attn = InternVitAttention(config, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(config, dtype, rngs)
    self.mlp = vit.MLP(config, dtype=dtype, rngs=rngs)
    self.layer_scale1 = nnx.Param(jnp.ones((d,), dtype))
    self.layer_scale2 = nnx.Param(jnp.ones((d,), dtype))


class InternVit(vit.Vit):
  """An InternViT vision tower; returns a ``vit.VitOutput`` (``select_features`` reads it)."""

  # Any input size, as transformers takes it (the position table resized bicubically): ``zoo``'s
  # ``@res=`` may resize its input.
  TAKES_ANY_INPUT_SIZE = True

  def __init__(self, config: InternVitConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    # Vit's __init__ builds the ViT variants' pieces; the inherited methods need only config,
    # dtype, patch_embed and layers.
    c = config
    self._init_class_token_stem(c, dtype, rngs, pos_embed=c.absolute_positions)
    self.layers = nnx.List(
        [InternVitLayer(c, dtype=dtype, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = None if c.mean_pooling else vit._layer_norm(c, dtype, rngs)  # pylint: disable=protected-access

  def _positions(self, height: int, width: int, grid: tuple[int, int]) -> jax.Array:
    """The (1, positions, hidden) position embeddings for an image of ``height`` x ``width``."""
    c = self.config
    pos = self.pos_embed[...]
    # transformers' interpolate_pos_encoding condition, verbatim (as DINOv2's).
    if grid[0] * grid[1] == c.num_positions - 1 and height == width:
      return pos
    # torch's bicubic, align_corners=False, no antialiasing; in float32 like torch here.
    return vit.resize_position_table(pos, c.grid, grid, antialias=False)

  def __call__(self, pixel_values: jax.Array,
               block_offsets: Sequence[jax.Array] | None = None) -> vit.VitOutput:
    """Runs the tower on a batch of NHWC images of any size of at least one patch.

    Position embeddings are resized (bicubic) for another grid, as transformers does.

    Args:
      pixel_values: (batch, height, width, channels) preprocessed images.
      block_offsets: As in ``vit.Vit.__call__``: one array per layer added to its output.

    Returns:
      ``VitOutput``: ``hidden_states`` are the embeddings then every layer's output (as
      transformers' ``output_hidden_states``), ``last_hidden_state`` the last one after the
      final LayerNorm where the config has one, ``pooler_output`` None (transformers has none).

    Raises:
      ValueError: not NHWC with ``num_channels`` channels, smaller than a patch, or
        ``block_offsets`` of the wrong length.
    """
    c = self.config
    b, height, width = self._check_pixels(pixel_values)
    grid = (height // c.patch_size[0], width // c.patch_size[1])
    if not grid[0] or not grid[1]:
      raise ValueError(f"input image size ({height}*{width}) is smaller than one patch "
                       f"{c.patch_size}")
    d = c.hidden_size
    x = self._embed_patches(pixel_values.astype(self.dtype), grid)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1)
    if self.pos_embed is not None:
      x = x + self._positions(height, width, grid)
    hidden = self._run_layers(x, block_offsets)
    x = hidden[-1]
    last = x if self.final_norm is None else self.final_norm(x)
    return vit.VitOutput(last_hidden_state=last, hidden_states=tuple(hidden), pooler_output=None,
                         num_prefix_tokens=1, grid=grid, has_class_token=True)
