"""The vision tower of Qwen2.5-VL (transformers' ``Qwen2_5_VisionTransformerPretrainedModel``) in
Flax NNX.

A ViT without CLS token or position table: patches of ``patch_size`` pixels are embedded by a
Conv3d over ``temporal_patch_size`` frames, every block rotates its queries and keys with a 2-D
rotary embedding of the patch's (row, column), pre-norm blocks use RMSNorm and a gated SiLU MLP
with biases, and most blocks attend only within square windows of ``window_size`` pixels (the
blocks of ``fullatt_block_indexes`` attend over the whole image). A PatchMerger then concatenates
each ``spatial_merge_size`` x ``spatial_merge_size`` square of patches (RMSNorm first) and maps it
through an MLP to ``out_hidden_size``: the tokens the Qwen2.5-VL language model reads.

Differences from transformers, none of them numerical beyond float rounding:

* Input: NHWC images of one size per batch (height and width multiples of ``patch_size`` x
  ``spatial_merge_size``), patched here, instead of the processor's flattened patch list with
  ``grid_thw``. An image is one frame repeated ``temporal_patch_size`` times, so the Conv3d is a
  2-D convolution whose kernel is the 3-D kernel summed over time: exact (the same sum regrouped).
* Token order: transformers orders tokens by merge unit and, inside its blocks, by attention
  window; here they stay in row-major order throughout. Attention does not depend on the order of
  the keys, and each token's rotary angles travel with it, so a block computes the same values;
  a windowed block gathers each window's tokens (``_windows``) and masks the padding of windows
  cut by the image border.

Layers (``Qwen25VisionOutput.hidden_states``, ``num_layers + 2`` entries): the patch embeddings,
every block's output (both at patch resolution, ``grid``), then the merger's output (at merged
resolution, ``merged_grid``). The last entry is the default layer (``GRID_DEFAULT_LAYER``): it is
what the Qwen2.5-VL language model was trained to read, as LLaVA's second-to-last layer is for its
LLM; the second-to-last entry is the last block's output, transformers' ``last_hidden_state``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vlmsel_jax.models import attention, hf_config
from vlmsel_jax.models.vit import modeling as vit

# Only the vision tower of the full VLM is built; its config is the VLM config's vision_config.
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)
SUPPORTED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
# The vision_config's own model_type: transformers 5's, and the one older Hub configs wrote.
VISION_MODEL_TYPES = ("qwen2_5_vl_vision", "qwen2_5_vl")

# transformers' Qwen2_5_VLVisionConfig defaults: save_pretrained leaves out fields equal to them.
_HF_DEFAULTS: dict[str, Any] = dict(
    depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
    in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31))
ROPE_THETA = 10000.0
# The blocks' and the merger's RMSNorms are built with this epsilon, whatever the config says.
RMS_NORM_EPS = 1e-6

ACTIVATIONS = {**vit.ACTIVATIONS, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig:
  """Architecture hyper-parameters of a Qwen2.5-VL vision tower.

  Attributes:
    hidden_size: Width of the residual stream.
    intermediate_size: Width of the gated MLP.
    num_layers: Number of blocks (transformers' ``depth``).
    num_heads: Attention heads; ``hidden_size / num_heads`` must be a multiple of 4 (the rotary
      embedding gives a quarter of each head's width to rows, a quarter to columns, twice).
    out_hidden_size: Width of the merger's output (the language model's width).
    patch_size: Side of one patch in pixels.
    temporal_patch_size: Frames per patch of the Conv3d patch embedding (an image repeats its
      frame).
    spatial_merge_size: Side, in patches, of the square the merger concatenates.
    window_size: Side of an attention window in pixels; a multiple of
      ``patch_size * spatial_merge_size``.
    fullatt_block_indexes: The blocks that attend over the whole image.
    num_channels: Image channels.
    hidden_act: MLP activation, a key of ``ACTIVATIONS``.
    rope_theta: Base of the rotary embedding's frequencies.
    model_type: The transformers ``model_type`` the config came from.
    attention_impl: ``"auto"``, ``"fused"`` or ``"einsum"`` (``vlmsel_jax.models.attention``).
    remat: Rematerialize each block in the backward pass.
  """

  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  out_hidden_size: int
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  num_channels: int = 3
  hidden_act: str = "silu"
  rope_theta: float = ROPE_THETA
  model_type: str = "qwen2_5_vl"
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    attention.check_impl(self.attention_impl)
    object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
      raise ValueError(f"hidden_size / num_heads ({self.hidden_size} / {self.num_heads}) must be "
                       "a whole multiple of 4 for the 2-D rotary embedding")
    if self.window_size % self.input_multiple or not self.window_size:
      raise ValueError(f"window_size ({self.window_size}) must be a positive multiple of "
                       f"patch_size * spatial_merge_size ({self.input_multiple})")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                       f"{', '.join(sorted(ACTIVATIONS))}")

  @property
  def input_multiple(self) -> int:
    """Input height and width must be multiples of this many pixels (one merged token)."""
    return self.patch_size * self.spatial_merge_size

  @property
  def window_patches(self) -> int:
    """Side of an attention window in patches."""
    return self.window_size // self.patch_size

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> Qwen25VisionConfig:
    """Reads the ``vision_config`` of a ``qwen2_5_vl`` config (a Qwen2.5-VL checkpoint's).

    Raises:
      ValueError: another model_type, or a rotary embedding other than transformers' axial one.
    """
    c = dict(hf_config.read_config(config))
    model_type = c.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not a Qwen2.5-VL; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    v = dict(c.get("vision_config") or {})
    if v.get("model_type", VISION_MODEL_TYPES[0]) not in VISION_MODEL_TYPES:
      raise ValueError(f"a qwen2_5_vl config needs a qwen2_5_vl_vision vision_config, got "
                       f"{v['model_type']!r}")
    # Hub configs written before transformers 4.50 name the channels in_chans.
    if "in_chans" in v and "in_channels" not in v:
      v["in_channels"] = v["in_chans"]
    v = {**_HF_DEFAULTS, **v}
    rope = dict(v.get("rope_parameters") or {})
    if rope.get("rope_type", "axial") != "axial":
      raise ValueError(f"vision rope_type {rope['rope_type']!r} is not supported (axial)")
    return cls(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_layers=v["depth"], num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"],
        patch_size=int(v["patch_size"]), temporal_patch_size=int(v["temporal_patch_size"]),
        spatial_merge_size=int(v["spatial_merge_size"]), window_size=int(v["window_size"]),
        fullatt_block_indexes=tuple(int(i) for i in v["fullatt_block_indexes"]),
        num_channels=int(v["in_channels"]), hidden_act=v["hidden_act"],
        rope_theta=float(rope.get("rope_theta", ROPE_THETA)), model_type=model_type)


def _rms_norm(width: int, dtype: Any, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """transformers' Qwen2_5_VLRMSNorm: x * rsqrt(mean(x^2) + eps) * weight."""
  return nnx.RMSNorm(width, epsilon=RMS_NORM_EPS, use_fast_variance=False, dtype=dtype,
                     param_dtype=dtype, rngs=rngs)


def rotary_tables(grid: tuple[int, int], head_dim: int, theta: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (rows * cols, head_dim) float32, of the 2-D rotary embedding, row-major.

  transformers' axial rope: head_dim / 4 frequencies theta^(-2i / (head_dim / 2)); the angles of
  a patch are its row times them, then its column times them, and that half repeated, so that
  ``rotate_half`` pairs channel j with channel j + head_dim / 2. In float32 as transformers.
  """
  half = head_dim // 2
  inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, half, 2, dtype=np.float32) /
                                           np.float32(half)))).astype(np.float32)
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  angles = np.concatenate([rows.reshape(-1, 1).astype(np.float32) * inv_freq,
                           cols.reshape(-1, 1).astype(np.float32) * inv_freq], axis=-1)
  angles = np.concatenate([angles, angles], axis=-1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding of (b, tokens, heads, head_dim) ``x``, in float32 as transformers."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos[:, None, :] + rotated * sin[:, None, :]).astype(dtype)


def _window_padding(grid: tuple[int, int], side: int) -> tuple[int, int]:
  """Rows and columns of padding that make the grid whole windows of ``side`` patches."""
  return (-grid[0] % side, -grid[1] % side)


def _windows(x: jax.Array, grid: tuple[int, int], side: int) -> jax.Array:
  """(b, rows * cols, d) row-major tokens -> (b * windows, side * side, d), one window per row.

  The windows tile the patch grid from its top-left corner, row by row, as transformers'
  ``get_vision_window_index`` lays them over the merged grid; the windows cut by the bottom and
  right borders are zero-padded to full size (``window_mask`` hides the padding).
  """
  b, _, d = x.shape
  pad_h, pad_w = _window_padding(grid, side)
  x = jnp.pad(x.reshape(b, *grid, d), ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  nh, nw = (grid[0] + pad_h) // side, (grid[1] + pad_w) // side
  x = x.reshape(b, nh, side, nw, side, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * nh * nw, side * side, d)


def _unwindows(x: jax.Array, batch: int, grid: tuple[int, int], side: int) -> jax.Array:
  """The inverse of ``_windows``: (b * windows, side * side, d) -> (b, rows * cols, d)."""
  d = x.shape[-1]
  pad_h, pad_w = _window_padding(grid, side)
  nh, nw = (grid[0] + pad_h) // side, (grid[1] + pad_w) // side
  x = x.reshape(batch, nh, nw, side, side, d).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(batch, nh * side, nw * side, d)[:, :grid[0], :grid[1]]
  return x.reshape(batch, grid[0] * grid[1], d)


def window_mask(batch: int, grid: tuple[int, int], side: int) -> np.ndarray:
  """(batch * windows, side * side) bool: the real (not padding) tokens of each window, in
  ``_windows``' layout; NumPy, so that it is a constant of a traced model."""
  pad_h, pad_w = _window_padding(grid, side)
  real = np.pad(np.ones(grid, bool), ((0, pad_h), (0, pad_w)))
  nh, nw = real.shape[0] // side, real.shape[1] // side
  real = real.reshape(nh, side, nw, side).transpose(0, 2, 1, 3).reshape(nh * nw, side * side)
  return np.tile(real, (batch, 1))


class VisionAttention(nnx.Module):
  """Multi-head attention with the 2-D rotary embedding, over the whole image or within windows.

  ``qkv`` is transformers' fused projection (queries, keys, values stacked on its output axis).
  """

  def __init__(self, config: Qwen25VisionConfig, windowed: bool, *, dtype: Any,
               rngs: nnx.Rngs):
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, **kw)
    self.proj = nnx.Linear(d, d, **kw)
    self.num_heads = config.num_heads
    self.windowed = windowed
    self.window_patches = config.window_patches
    self.attention_impl = config.attention_impl

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """(b, rows, cols, d) row-major tokens -> the attention output, same shape."""
    b, rows, cols, d = x.shape
    n, heads = rows * cols, self.num_heads
    qkv = self.qkv(x.reshape(b, n, d)).reshape(b, n, 3, heads, d // heads)
    q, k, v = _rotate(qkv[:, :, 0], cos, sin), _rotate(qkv[:, :, 1], cos, sin), qkv[:, :, 2]
    q, k, v = (t.reshape(b, n, d) for t in (q, k, v))
    if not self.windowed:
      out = vit._attend(q, k, v, heads, self.attention_impl)  # pylint: disable=protected-access
    else:
      grid, side = (rows, cols), self.window_patches
      mask = None
      if any(_window_padding(grid, side)):
        mask = jnp.asarray(window_mask(b, grid, side))
      out = vit._attend(*(_windows(t, grid, side) for t in (q, k, v)), heads,  # pylint: disable=protected-access
                        self.attention_impl, mask)
      out = _unwindows(out, b, grid, side)
    return self.proj(out).reshape(b, rows, cols, d)


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)), every projection with a bias."""

  def __init__(self, config: Qwen25VisionConfig, *, dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = nnx.Linear(d, f, **kw)
    self.up_proj = nnx.Linear(d, f, **kw)
    self.down_proj = nnx.Linear(f, d, **kw)
    self.hidden_act = config.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(ACTIVATIONS[self.hidden_act](self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
  """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(.))."""

  def __init__(self, config: Qwen25VisionConfig, windowed: bool, *, dtype: Any,
               rngs: nnx.Rngs):
    self.norm1 = _rms_norm(config.hidden_size, dtype, rngs)
    self.attn = VisionAttention(config, windowed, dtype=dtype, rngs=rngs)
    self.norm2 = _rms_norm(config.hidden_size, dtype, rngs)
    self.mlp = GatedMLP(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), cos, sin)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then each merge x merge square of patches concatenated (row-major inside the
  square, as transformers' merge units) and mapped by Linear -> GELU (exact) -> Linear."""

  def __init__(self, config: Qwen25VisionConfig, *, dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    m = config.spatial_merge_size
    width = config.hidden_size * m * m
    self.norm = _rms_norm(config.hidden_size, dtype, rngs)
    self.fc1 = nnx.Linear(width, width, **kw)
    self.fc2 = nnx.Linear(width, config.out_hidden_size, **kw)
    self.merge = m

  def __call__(self, x: jax.Array) -> jax.Array:
    """(b, rows, cols, d) -> (b, rows / merge * cols / merge, out) row-major merged tokens."""
    b, rows, cols, d = x.shape
    m = self.merge
    x = self.norm(x).reshape(b, rows // m, m, cols // m, m, d).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (rows // m) * (cols // m), m * m * d)
    return self.fc2(vit.ACTIVATIONS["gelu"](self.fc1(x)))


class PatchEmbed(nnx.Module):
  """The Conv3d patch embedding (no bias) applied to an image, i.e. its frame repeated
  ``temporal_patch_size`` times.

  ``kernel`` keeps the checkpoint's torch layout (hidden, channels, frames, patch, patch). The
  frames of a patch are equal, so the 3-D convolution is the 2-D one with the kernel summed over
  frames: exactly the same sum, regrouped. It runs as one matmul over flattened patches.
  """

  def __init__(self, config: Qwen25VisionConfig, *, dtype: Any, rngs: nnx.Rngs):
    c = config
    shape = (c.hidden_size, c.num_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
    self.kernel = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape, dtype))
    self.patch_size = c.patch_size

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """(b, height, width, channels) -> (b, rows, cols, hidden)."""
    b, height, width, channels = pixels.shape
    p = self.patch_size
    rows, cols = height // p, width // p
    kernel = self.kernel[...].sum(axis=2)  # (hidden, channels, p, p)
    patches = pixels.reshape(b, rows, p, cols, p, channels).transpose(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, rows, cols, channels * p * p) @ kernel.reshape(kernel.shape[0], -1).T


@struct.dataclass
class Qwen25VisionOutput:
  """What ``Qwen25VisionTower.__call__`` returns; a pytree, so it passes through ``jax.jit``.

  Attributes:
    hidden_states: ``num_layers + 2`` arrays: the patch embeddings and every block's output,
      (batch, rows * cols, hidden_size) row-major over ``grid``; then the merger's output,
      (batch, rows * cols / merge^2, out_hidden_size) row-major over ``merged_grid``.
    grid: (rows, cols) of patches.
    merge: ``spatial_merge_size``.
  """

  hidden_states: tuple[jax.Array, ...]
  grid: tuple[int, int] = struct.field(pytree_node=False)
  merge: int = struct.field(pytree_node=False)

  @property
  def merged_grid(self) -> tuple[int, int]:
    return (self.grid[0] // self.merge, self.grid[1] // self.merge)

  @property
  def last_hidden_state(self) -> jax.Array:
    """The last block's output: transformers' ``last_hidden_state``, in row-major order."""
    return self.hidden_states[-2]

  @property
  def merged(self) -> jax.Array:
    """The merger's output: transformers' ``pooler_output``, one image's tokens per row."""
    return self.hidden_states[-1]

  def grid_of(self, layer: int) -> tuple[int, int]:
    """(rows, cols) of ``hidden_states[layer]``."""
    last = len(self.hidden_states) - 1
    return self.merged_grid if layer % len(self.hidden_states) == last else self.grid


POOLINGS = ("mean", "patch_grid")


def select_features(output: Qwen25VisionOutput, layer: int = -1,
                    pooling: str = "mean") -> jax.Array:
  """One image representation out of a ``Qwen25VisionOutput``; jittable (arguments static).

  Args:
    output: What the tower returned.
    layer: Index into ``output.hidden_states`` (-1: the merger's output).
    pooling: ``"mean"``: the mean of the layer's tokens (batch, dim); ``"patch_grid"``: the
      tokens as (batch, rows, cols, dim).

  Raises:
    ValueError: an unknown pooling.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
  h = output.hidden_states[layer]
  if pooling == "mean":
    return jnp.mean(h, axis=1)
  return h.reshape(h.shape[0], *output.grid_of(layer), h.shape[-1])


class Qwen25VisionTower(nnx.Module):
  """The Qwen2.5-VL vision tower; returns a ``Qwen25VisionOutput``."""

  # Any input size that is a multiple of ``config.input_multiple`` (no position table to
  # resize): ``zoo``'s ``@res=`` may pick it.
  TAKES_ANY_INPUT_SIZE = True
  # The vision-tower protocol (``vlm.tower_grid``, ``features.patch_grid``): the merger's output,
  # the tokens the Qwen2.5-VL language model reads (module docstring).
  GRID_DEFAULT_LAYER = -1

  def __init__(self, config: Qwen25VisionConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtype = jnp.dtype(dtype)
    self.patch_embed = PatchEmbed(c, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([
        VisionBlock(c, i not in c.fullatt_block_indexes, dtype=dtype, rngs=rngs)
        for i in range(c.num_layers)])
    self.merger = PatchMerger(c, dtype=dtype, rngs=rngs)

  def patch_grid(self, pixels: jax.Array, layer: int) -> jax.Array:
    """(batch, rows, cols, dim) tokens at ``layer``: patches, or merged tokens at -1."""
    return select_features(self(pixels), layer, "patch_grid")

  def __call__(self, pixel_values: jax.Array) -> Qwen25VisionOutput:
    """Runs the tower on a batch of NHWC images of one size.

    Args:
      pixel_values: (batch, height, width, channels) preprocessed images; height and width are
        multiples of ``config.input_multiple``.

    Returns:
      ``Qwen25VisionOutput`` (the module docstring lists its layers).

    Raises:
      ValueError: not NHWC with ``num_channels`` channels, or a size that is not a positive
        multiple of ``config.input_multiple``.
    """
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
      raise ValueError(f"pixel_values must be NHWC (batch, height, width, {c.num_channels}); "
                       f"got shape {tuple(pixel_values.shape)}")
    b, height, width, _ = pixel_values.shape
    m = c.input_multiple
    if not height or not width or height % m or width % m:
      raise ValueError(f"input image size ({height}*{width}) must be a positive multiple of "
                       f"{m} (patch_size {c.patch_size} * spatial_merge_size "
                       f"{c.spatial_merge_size}) on each side")
    grid = (height // c.patch_size, width // c.patch_size)
    cos, sin = (jnp.asarray(t) for t in rotary_tables(grid, c.hidden_size // c.num_heads,
                                                       c.rope_theta))
    x = self.patch_embed(pixel_values.astype(self.dtype))
    hidden = [x]
    for block in self.blocks:
      x = attention.remat_call(c.remat, block, x, cos, sin)
      hidden.append(x)
    tokens = [h.reshape(b, grid[0] * grid[1], c.hidden_size) for h in hidden]
    tokens.append(self.merger(x))
    return Qwen25VisionOutput(hidden_states=tuple(tokens), grid=grid, merge=c.spatial_merge_size)
