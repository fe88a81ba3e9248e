"""SigLIP2's NaFlex vision tower in Flax NNX, built from the ``vit`` package's SigLIP pieces.

transformers' ``siglip2`` model_type (``Siglip2Model`` / ``Siglip2VisionModel``, e.g.
``google/siglip2-base-patch16-naflex``) is always the NaFlex ("native flexible resolution") model.
The fixed-resolution SigLIP2 checkpoints on the Hub (``google/siglip2-base-patch16-224``, ...)
are ``siglip`` model_type and load as ``vit.Vit``. NaFlex is SigLIP with three changes:

* The patch embedding is an ``nn.Linear`` over patches flattened in (row, column, channel) order;
  kept as an (in, out) kernel, it is exactly the (patch, patch, channels, out) convolution kernel
  ``Vit._embed_patches`` multiplies by, so the patch projection is shared.
* The learned positions are an (S, S) grid (S² = ``num_patches``), resized per image to that
  image's patch grid with torch's antialiased bilinear interpolation
  (``antialiased_bilinear_weights``) and, in a padded sequence, repeated from the first position
  over the padding (as transformers fills it).
* A sequence may end in padding: the encoder's and the pooling head's attention then skip the
  padding keys (``pixel_attention_mask``).

``Siglip2Vit`` takes two inputs:

* ``__call__(pixels)``: NHWC images whose sides are multiples of the patch size, one (rows, cols)
  grid for the whole batch and no padding. It returns a ``vit.VitOutput``, so the feature
  functions, ``select_features``, the vision-tower protocol (``patch_grid``), the VLM, the C score
  and layer conductance treat it as any ViT. This is how the zoo runs it: each image resized to a
  fixed grid (see ``zoo.loaders``), because a VLM needs a static number of image tokens and a
  jitted batch a static shape. A square image gets that grid from transformers' processor too.
* ``naflex(pixel_values, spatial_shapes, pixel_attention_mask)``: transformers' NaFlex inputs (as
  ``preprocessing.NaflexPreprocessing`` makes them): every image resized, keeping its aspect
  ratio, to at most ``max_num_patches`` patches, flattened and padded to that length. The shapes
  are data, not static: one jitted function runs any mix of aspect ratios of a given length. It
  returns a ``NaflexOutput`` (its grids differ per image; ``select_naflex_features`` pools it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vlmsel_jax.models import hf_config
from vlmsel_jax.models.vit import modeling as vit

SUPPORTED_MODEL_TYPES = ("siglip2", "siglip2_vision_model")
SUPPORTED_ARCHITECTURES = ("Siglip2Model", "Siglip2VisionModel")
NAFLEX_POOLINGS = ("mean", "pooler")

# transformers' Siglip2VisionConfig defaults: save_pretrained's sub-configs and hub files leave
# out the fields that equal them.
_HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    vision_use_head=True, num_patches=256)


def config_from_hf(config: Mapping[str, Any] | str) -> vit.VitConfig:
  """The ``VitConfig`` of a transformers ``siglip2`` / ``siglip2_vision_model`` config.

  A NaFlex tower is a SigLIP ``VitConfig`` whose ``image_size`` is the position grid in pixels
  (S patches a side, S² = ``num_patches``); ``model_type`` keeps the NaFlex type. A full
  ``Siglip2Model`` config (``siglip2``) describes its ``vision_config`` and is ``contrastive``.

  Raises:
    ValueError: another model_type, a ``num_patches`` that is no square, a non-square patch, or a
      field ``VitConfig.from_hf`` rejects (an activation, say).
  """
  c = dict(hf_config.read_config(config))
  model_type = c.get("model_type")
  contrastive = model_type == "siglip2"
  if contrastive:
    c = dict(c.get("vision_config") or {})
    if c.get("model_type", "siglip2_vision_model") != "siglip2_vision_model":
      raise ValueError(f"a 'siglip2' config needs a siglip2_vision_model vision_config, got "
                       f"{c.get('model_type')!r}")
  elif model_type != "siglip2_vision_model":
    raise ValueError(f"model_type {model_type!r} is not SigLIP2 NaFlex; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  c = {**_HF_DEFAULTS, **c}
  side = math.isqrt(c["num_patches"])
  if side * side != c["num_patches"]:
    raise ValueError(f"num_patches {c['num_patches']} is not a square: the position table is an "
                     "S x S grid")
  if not isinstance(c["patch_size"], int):
    raise ValueError(f"patch_size {c['patch_size']!r}: SigLIP2 NaFlex patches are square (an int)")
  # Read as the SigLIP vision config it is, with the position grid as its native image.
  as_siglip = {**c, "model_type": "siglip_vision_model", "image_size": side * c["patch_size"]}
  return dataclasses.replace(vit.VitConfig.from_hf(as_siglip), contrastive=contrastive,
                             model_type="siglip2_vision_model")


def antialiased_bilinear_weights(index: jax.Array, out_size: jax.Array,
                                 in_size: int) -> jax.Array:
  """Rows of torch's 1-D bilinear resize matrix, ``antialias=True``, ``align_corners=False``.

  ``F.interpolate(..., mode="bilinear", antialias=True)`` resizes each axis with these weights:
  a triangle filter around each output pixel's centre, widened by the downscale factor, cut to
  the input and renormalised (torch's ``_compute_indices_min_size_weights_aa``). ``out_size`` may
  be traced, so one compiled function resizes to any size.

  Args:
    index: Integer output positions, any shape.
    out_size: Integer output lengths, broadcastable against ``index``; at least 1.
    in_size: The input length (static).

  Returns:
    float32 weights of shape ``broadcast(index, out_size).shape + (in_size,)``; each row sums to 1.
  """
  i = jnp.asarray(index, jnp.float32)[..., None]
  scale = in_size / jnp.maximum(jnp.asarray(out_size, jnp.float32), 1.0)[..., None]
  support = jnp.maximum(scale, 1.0)  # The filter's half-width (1) times the downscale factor.
  inv_scale = jnp.where(scale >= 1.0, 1.0 / scale, 1.0)
  center = scale * (i + 0.5)
  # torch truncates toward zero; after the clamp at 0, floor gives the same bounds.
  lo = jnp.maximum(jnp.floor(center - support + 0.5), 0.0)
  hi = jnp.minimum(jnp.floor(center + support + 0.5), float(in_size))
  j = jnp.arange(in_size, dtype=jnp.float32)
  taps = jnp.maximum(1.0 - jnp.abs((j - center + 0.5) * inv_scale), 0.0)
  taps = jnp.where((j >= lo) & (j < hi), taps, 0.0)
  return taps / jnp.sum(taps, axis=-1, keepdims=True)


def resize_positions(table: jax.Array, spatial_shapes: jax.Array, length: int) -> jax.Array:
  """NaFlex's position embeddings of each image, flattened row-major and padded to ``length``.

  Args:
    table: (S * S, hidden) learned positions, an S x S grid.
    spatial_shapes: (batch, 2) integer (rows, columns) patch grid of each image; may be traced.
    length: The sequence length; rows * columns <= length.

  Returns:
    (batch, length, hidden) float32: the grid resized to each image's (rows, columns), then the
    first position repeated over the padding, as transformers' ``resize_positional_embeddings``.
  """
  side = math.isqrt(table.shape[0])
  grid = table.reshape(side, side, -1).astype(jnp.float32)
  shapes = jnp.asarray(spatial_shapes, jnp.int32)
  rows, cols = shapes[:, :1], shapes[:, 1:]
  k = jnp.arange(length)[None, :]
  inside = k < rows * cols
  safe_cols = jnp.maximum(cols, 1)
  row_weights = antialiased_bilinear_weights(jnp.where(inside, k // safe_cols, 0), rows, side)
  col_weights = antialiased_bilinear_weights(jnp.where(inside, k % safe_cols, 0), cols, side)
  # Full float32 precision: torch resizes in float32, and accelerators default to less.
  return jnp.einsum("bkr,rcd,bkc->bkd", row_weights, grid, col_weights,
                    precision=jax.lax.Precision.HIGHEST)


@struct.dataclass
class NaflexOutput:
  """What ``Siglip2Vit.naflex`` returns; a pytree.

  Attributes:
    last_hidden_state: (batch, length, hidden), after the final LayerNorm, padding included.
    hidden_states: ``num_layers + 1`` arrays (batch, length, hidden): the embeddings, then every
      layer's output (the last before the final LayerNorm), as transformers'.
    pooler_output: (batch, hidden) of the attention-pooling head (which skips the padding), or
      None without ``vision_use_head``.
    patch_mask: (batch, length) bool, True at the image's patches, False at the padding.
  """

  last_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...]
  pooler_output: jax.Array | None
  patch_mask: jax.Array


def select_naflex_features(output: NaflexOutput, layer: int | None = -1,
                           pooling: str = "mean") -> jax.Array:
  """One (batch, hidden) vector per image from a ``NaflexOutput``; jittable (``layer`` and
  ``pooling`` static).

  Args:
    output: What ``Siglip2Vit.naflex`` returned.
    layer: Index into ``hidden_states``, or None for ``last_hidden_state``; must stay at its
      default for ``pooling="pooler"``.
    pooling: ``"mean"``: the mean of the image's own patch tokens (the padding left out);
      ``"pooler"``: ``pooler_output``.

  Raises:
    ValueError: an unknown pooling, "pooler" without a head, or a ``layer`` given with it.
  """
  if pooling not in NAFLEX_POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(NAFLEX_POOLINGS)} (NaFlex "
                     "grids differ per image: run the tower on a fixed grid for patch grids)")
  if pooling == "pooler":
    if layer != -1:
      raise ValueError("pooling='pooler' reads pooler_output, which has no layer; leave layer "
                       "at its default")
    if output.pooler_output is None:
      raise ValueError("this model has no pooler_output")
    return output.pooler_output
  h = output.last_hidden_state if layer is None else output.hidden_states[layer]
  weights = output.patch_mask.astype(h.dtype)[..., None]
  return jnp.sum(h * weights, axis=1) / jnp.sum(weights, axis=1)


class Siglip2Vit(vit.Vit):
  """A SigLIP2 NaFlex vision tower: a SigLIP ``Vit`` with a linear patch embedding, resized
  positions and padding masks (see the module docstring for its two inputs)."""

  def __init__(self, config: vit.VitConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if config.variant != "siglip" or config.grid[0] != config.grid[1]:
      raise ValueError(f"a SigLIP2 NaFlex tower is a siglip variant with a square position grid; "
                       f"got variant {config.variant!r}, grid {config.grid}")
    super().__init__(config, dtype=dtype, rngs=rngs)
    ph, pw = config.patch_size
    # The checkpoint's nn.Linear, (patch * patch * channels) -> hidden; same numbers as the
    # convolution kernel it replaces, which ``_embed_patches`` reads as this matrix anyway.
    self.patch_embed = nnx.Linear(ph * pw * config.num_channels, config.hidden_size, dtype=dtype,
                                  param_dtype=dtype, rngs=rngs)

  def _positions_for(self, spatial_shapes: jax.Array, length: int) -> jax.Array:
    """(batch, length, hidden) positions of each grid, in the model dtype (``resize_positions``)."""
    return resize_positions(self.pos_embed[...], spatial_shapes, length).astype(self.dtype)

  def __call__(self, pixel_values: jax.Array,
               block_offsets: Sequence[jax.Array] | None = None) -> vit.VitOutput:
    """Runs the tower on NHWC images of one size: one patch grid for the batch, no padding.

    Args:
      pixel_values: (batch, height, width, channels) preprocessed images; height and width are
        positive multiples of the patch size (any, not only the position grid's).
      block_offsets: As in ``Vit.__call__``.

    Returns:
      A ``vit.VitOutput`` (no prefix tokens; ``grid`` the image's patch grid).

    Raises:
      ValueError: not NHWC with ``config.num_channels`` channels, or a side that is not a
        positive multiple of the patch size.
    """
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
      raise ValueError(f"pixel_values must be NHWC (batch, height, width, {c.num_channels}); "
                       f"got shape {tuple(pixel_values.shape)}")
    _, height, width, _ = pixel_values.shape
    (ph, pw) = c.patch_size
    if not height or not width or height % ph or width % pw:
      raise ValueError(f"input image size ({height}*{width}) is not a positive multiple of the "
                       f"patch size {c.patch_size}: NaFlex images are whole patches")
    grid = (height // ph, width // pw)
    x = self._embed_patches(pixel_values.astype(self.dtype), grid)
    x = x + self._positions_for(jnp.asarray([grid], jnp.int32), grid[0] * grid[1])
    hidden, last, pooled = self._encode(x, block_offsets)
    return vit.VitOutput(last_hidden_state=last, hidden_states=hidden, pooler_output=pooled,
                         num_prefix_tokens=0, grid=grid, has_class_token=False)

  def naflex(self, pixel_values: jax.Array, spatial_shapes: jax.Array,
             pixel_attention_mask: jax.Array,
             block_offsets: Sequence[jax.Array] | None = None) -> NaflexOutput:
    """Runs the tower on transformers' NaFlex inputs: patch sequences padded to one length.

    Args:
      pixel_values: (batch, length, patch * patch * channels) flattened patches, each row-major
        over its image's grid, in (row, column, channel) order within a patch.
      spatial_shapes: (batch, 2) integer (rows, columns) of each image's patch grid.
      pixel_attention_mask: (batch, length), 1 / True at patches and 0 / False at padding.
      block_offsets: As in ``Vit.__call__``, each broadcastable to (batch, length, hidden).

    Returns:
      A ``NaflexOutput``.

    Raises:
      ValueError: shapes that do not fit together or the patch size.
    """
    c = self.config
    ph, pw = c.patch_size
    flat = ph * pw * c.num_channels
    if pixel_values.ndim != 3 or pixel_values.shape[-1] != flat:
      raise ValueError(f"pixel_values must be (batch, length, {flat}) flattened patches; got "
                       f"shape {tuple(pixel_values.shape)}")
    b, length, _ = pixel_values.shape
    if tuple(spatial_shapes.shape) != (b, 2) or tuple(pixel_attention_mask.shape) != (b, length):
      raise ValueError(f"spatial_shapes must be ({b}, 2) and pixel_attention_mask ({b}, "
                       f"{length}); got {tuple(spatial_shapes.shape)} and "
                       f"{tuple(pixel_attention_mask.shape)}")
    mask = jnp.asarray(pixel_attention_mask).astype(bool)
    x = self.patch_embed(pixel_values.astype(self.dtype))
    x = x + self._positions_for(spatial_shapes, length)
    hidden, last, pooled = self._encode(x, block_offsets, mask)
    return NaflexOutput(last_hidden_state=last, hidden_states=hidden, pooler_output=pooled,
                        patch_mask=mask)
