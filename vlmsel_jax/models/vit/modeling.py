"""Vision transformers of the CLIP, SigLIP, DINOv2 and ViT checkpoints, as one Flax NNX module.

The four share patch embedding by a strided convolution, learned position embeddings and pre-norm
encoder layers (LayerNorm, multi-head self-attention, a two-layer MLP), and differ in a handful of
pieces, which ``VitConfig.variant`` switches on:

* ``"clip"``: CLS token, a LayerNorm before the encoder (``pre_layrnorm``), quick-GELU, and a
  LayerNorm on the pooled CLS token only (``post_layernorm``); no patch-embedding bias.
* ``"siglip"``: no CLS token, a final LayerNorm on every token, and a multi-head attention-pooling
  head for ``pooler_output``.
* ``"dinov2"``: CLS token, optional register tokens, layer scale after attention and MLP, an
  optional SwiGLU MLP, a final LayerNorm; position embeddings are resized (bicubic, like
  transformers) when the image is not the native size.
* ``"vit"``: CLS token, a final LayerNorm and an optional dense + tanh pooler on the CLS token.

Images are NHWC, ``(batch, height, width, channels)``, the layout ``nnx.Conv`` works in; a
transformers ``pixel_values`` batch (NCHW) becomes ours with ``x.transpose(0, 2, 3, 1)``. The
numerics follow transformers' torch implementations so that hidden states match them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vlmsel_jax.models import attention, hf_config

VARIANTS = ("clip", "siglip", "dinov2", "vit")
POOLINGS = ("cls", "mean", "patch_grid", "pooler")

# transformers model_type -> the variant of its vision tower. "clip" and "siglip" are the full
# contrastive models; only their vision tower is built.
SUPPORTED_MODEL_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model", "dinov2",
                         "dinov2_with_registers", "vit")
SUPPORTED_ARCHITECTURES = ("CLIPModel", "CLIPVisionModel", "SiglipModel", "SiglipVisionModel",
                           "Dinov2Model", "Dinov2WithRegistersModel", "ViTModel")
_VARIANT_OF = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "dinov2": "dinov2",
               "dinov2_with_registers": "dinov2", "vit": "vit"}

# The transformers config-class defaults of each vision model_type: hub config.json files (and
# save_pretrained's diff-only sub-configs) leave out fields that equal them.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, num_channels=3, image_size=224,
                              patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224,
                                patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, vision_use_head=True),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
                   num_channels=3, qkv_bias=True, use_swiglu_ffn=False),
    "dinov2_with_registers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6,
                                  image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
                                  use_swiglu_ffn=False, num_register_tokens=4),
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, image_size=224,
                patch_size=16, num_channels=3, qkv_bias=True, pooler_output_size=None,
                pooler_act="tanh"),
}


def _erf_gelu(x: jax.Array) -> jax.Array:
  # torch's exact GELU, written as torch writes it: faster on XLA:CPU than jax.nn.gelu's
  # erfc form (benchmarks/README.md).
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names of the activations these checkpoints use.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _erf_gelu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
}


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  """An int or a 2-sequence as a (height, width) tuple of ints."""
  if isinstance(value, int):
    return (value, value)
  height, width = value
  return (int(height), int(width))


class TowerConfig:
  """What the configs of the patch-embedding vision towers share (``VitConfig`` and the
  InternViT and EVA-02 configs, which reuse this module's pieces).

  Each declares these fields, in its own order among its own:

    hidden_size: Width of the residual stream.
    intermediate_size: Width of the MLP (for a SwiGLU: of each of its two branches).
    num_layers: Number of encoder layers (blocks).
    num_heads: Number of attention heads; divides ``hidden_size``.
    image_size: Native (height, width) in pixels; the position embeddings are for this size.
    patch_size: (height, width) of one patch in pixels.
    num_channels: Image channels.
    layer_norm_eps: Epsilon of every LayerNorm.
    hidden_act: MLP activation, a key of ``ACTIVATIONS`` (unused by a SwiGLU MLP; EVA-02 has
      none).
    attention_impl: How attention is computed: ``"auto"``, ``"fused"`` or ``"einsum"``
      (``vlmsel_jax.models.attention``); not part of the checkpoint.
    remat: Rematerialize each encoder layer in the backward pass (``jax.checkpoint``); not part of
      the checkpoint.
  """

  def _check_tower(self) -> None:
    """Checks ``attention_impl`` and makes ``image_size`` and ``patch_size`` pairs."""
    attention.check_impl(self.attention_impl)
    object.__setattr__(self, "image_size", _pair(self.image_size))
    object.__setattr__(self, "patch_size", _pair(self.patch_size))

  def _check_heads_and_act(self) -> None:
    """Checks that the heads divide ``hidden_size`` and that ``hidden_act`` is known."""
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                       f"({self.num_heads})")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                       f"{', '.join(sorted(ACTIVATIONS))}")

  def _check_image_fits(self) -> None:
    """Checks that the native image holds at least one patch."""
    if any(i < p for i, p in zip(self.image_size, self.patch_size)):
      raise ValueError(f"image_size {self.image_size} is smaller than patch_size "
                       f"{self.patch_size}")

  @property
  def grid(self) -> tuple[int, int]:
    """The native (rows, columns) of patches."""
    return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])


class ClassTokenTowerConfig(TowerConfig):
  """A ``TowerConfig`` whose sequence is one CLS token, then the patch tokens."""

  @property
  def has_class_token(self) -> bool:
    return True

  @property
  def num_prefix_tokens(self) -> int:
    return 1

  @property
  def num_positions(self) -> int:
    """Rows of the position table: one per native patch, plus the CLS token's."""
    return self.grid[0] * self.grid[1] + 1


@dataclasses.dataclass(frozen=True)
class VitConfig(TowerConfig):
  """Architecture hyper-parameters of a CLIP / SigLIP / DINOv2 / ViT vision transformer:
  ``TowerConfig``'s fields, plus:

  Attributes:
    variant: Which checkpoint family's layout and pieces to build: one of ``VARIANTS``.
    qkv_bias: Whether the q/k/v projections have biases.
    num_register_tokens: DINOv2 register tokens, inserted after the CLS token.
    swiglu: DINOv2 (giant) SwiGLU MLP instead of fc1 -> activation -> fc2.
    antialias_positions: Resize DINOv2 position embeddings with antialiased bicubic
      interpolation, as transformers' ``Dinov2WithRegistersModel`` does (``Dinov2Model`` does
      not antialias).
    pooler: Whether the model produces ``pooler_output``: for SigLIP the attention-pooling head
      (``vision_use_head``), for ViT the dense + tanh pooler; CLIP and DINOv2 always pool.
    pooler_output_size: Output width of the ViT pooler.
    contrastive: The checkpoint is a full ``CLIPModel`` / ``SiglipModel``: the vision weights sit
      under ``vision_model.`` and the text tower and projections are skipped.
    model_type: The transformers ``model_type`` the config came from.
  """

  variant: str
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  image_size: tuple[int, int]
  patch_size: tuple[int, int]
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  num_register_tokens: int = 0
  swiglu: bool = False
  antialias_positions: bool = False
  pooler: bool = True
  pooler_output_size: int | None = None
  contrastive: bool = False
  model_type: str = ""
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    self._check_tower()
    if self.variant not in VARIANTS:
      raise ValueError(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
    self._check_heads_and_act()
    if self.variant != "dinov2" and (self.num_register_tokens or self.swiglu):
      raise ValueError("register tokens and the SwiGLU MLP exist only in the dinov2 variant")
    if self.variant in ("clip", "dinov2") and not self.pooler:
      raise ValueError(f"the {self.variant} variant always has a pooler_output")
    if self.pooler_output_size is None:
      object.__setattr__(self, "pooler_output_size", self.hidden_size)
    self._check_image_fits()

  @property
  def has_class_token(self) -> bool:
    """Whether the sequence starts with a CLS token (every variant but SigLIP)."""
    return self.variant != "siglip"

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens: the CLS token and any registers."""
    return int(self.has_class_token) + self.num_register_tokens

  @property
  def num_positions(self) -> int:
    """Rows of the position table: one per native patch, plus the CLS token's."""
    return self.grid[0] * self.grid[1] + int(self.has_class_token)

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> VitConfig:
    """Reads a transformers ``config.json`` (a dict, the file, or its directory).

    For a full ``CLIPModel`` / ``SiglipModel`` config (model_type ``clip`` / ``siglip``) the
    ``vision_config`` sub-dict describes the model built. Fields the file leaves out take the
    transformers defaults of that model_type. A ViT config may carry ``add_pooling_layer: false``
    (not a transformers field) for a ``ViTModel`` saved without its pooler.

    Raises:
      ValueError: the config is not one of ``SUPPORTED_MODEL_TYPES`` or uses a feature this
        implementation does not have (another activation, a pooler activation other than tanh).
    """
    config = hf_config.read_config(config)
    c = dict(config)
    model_type = c.get("model_type")
    contrastive = model_type in ("clip", "siglip")
    if contrastive:
      vision = dict(c.get("vision_config") or {})
      vision_type = vision.get("model_type", f"{model_type}_vision_model")
      if vision_type != f"{model_type}_vision_model":
        raise ValueError(f"a {model_type!r} config needs a {model_type}_vision_model "
                         f"vision_config, got {vision_type!r}")
      c, model_type = vision, vision_type
    if model_type not in _HF_DEFAULTS:
      raise ValueError(f"model_type {model_type!r} is not a vision transformer supported here; "
                       f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    c = {**_HF_DEFAULTS[model_type], **c}
    variant = _VARIANT_OF[model_type]
    hidden = c["hidden_size"]

    pooler = True
    if variant == "dinov2":
      # DINOv2 configs give mlp_ratio, not a width.
      intermediate = int(hidden * c["mlp_ratio"])
      if c["use_swiglu_ffn"]:
        # SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8.
        intermediate = (int(intermediate * 2 / 3) + 7) // 8 * 8
    else:
      intermediate = c["intermediate_size"]
    if variant == "siglip":
      pooler = bool(c["vision_use_head"])
    if variant == "vit":
      pooler = bool(c.get("add_pooling_layer", True))
      if pooler and c["pooler_act"] != "tanh":
        raise ValueError(f"pooler_act {c['pooler_act']!r} is not supported; the ViT pooler "
                         "here uses 'tanh'")

    return cls(
        variant=variant,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        image_size=_pair(c["image_size"]),
        patch_size=_pair(c["patch_size"]),
        num_channels=c["num_channels"],
        layer_norm_eps=float(c["layer_norm_eps"]),
        hidden_act=c["hidden_act"],
        qkv_bias=bool(c.get("qkv_bias", True)),
        num_register_tokens=int(c.get("num_register_tokens", 0)),
        swiglu=bool(c.get("use_swiglu_ffn", False)),
        antialias_positions=model_type == "dinov2_with_registers",
        pooler=pooler,
        pooler_output_size=c.get("pooler_output_size") or hidden,
        contrastive=contrastive,
        model_type=model_type,
    )


def _cubic(x: float, a: float) -> float:
  """The Keys cubic convolution kernel with parameter ``a`` at distance ``x``."""
  x = abs(x)
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  if x < 2.0:
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return 0.0


def bicubic_resize_weights(in_size: int, out_size: int, *, antialias: bool) -> np.ndarray:
  """The (out_size, in_size) matrix of torch's 1-D bicubic resize, ``align_corners=False``.

  Resizing along one axis is this matrix times the input; the 2-D resize applies one per axis,
  exactly as ``torch.nn.functional.interpolate(mode="bicubic", size=...)`` does.

  Args:
    in_size: Input length.
    out_size: Output length.
    antialias: Reproduce ``antialias=True`` (a = -0.5 kernel widened by the downscale factor and
      renormalised at the borders) instead of the plain a = -0.75 kernel with replicated borders.
  """
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    if antialias:
      # torch's _compute_weights_aa: the support widens by the scale when downsampling.
      support = 2.0 * scale if scale >= 1.0 else 2.0
      inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      taps = np.array([_cubic((j - center + 0.5) * inv_scale, -0.5) for j in range(lo, hi)])
      total = taps.sum()
      weights[i, lo:hi] = taps / total if total != 0.0 else taps
    else:
      # torch's compute_indices_weights_cubic with guard_index_and_lambda.
      real = scale * (i + 0.5) - 0.5
      index = min(math.floor(real), in_size - 1)
      t = min(max(real - index, 0.0), 1.0)
      taps = (_cubic(t + 1.0, -0.75), _cubic(t, -0.75), _cubic(1.0 - t, -0.75),
              _cubic(2.0 - t, -0.75))
      for k, w in enumerate(taps):
        weights[i, min(max(index - 1 + k, 0), in_size - 1)] += w
  return weights.astype(np.float32)


def resize_grid(grid: jax.Array, size: tuple[int, int], *, antialias: bool) -> jax.Array:
  """Bicubically resizes a (rows, columns, channels) grid to ``size`` like torch does."""
  rows = jnp.asarray(bicubic_resize_weights(grid.shape[0], size[0], antialias=antialias))
  cols = jnp.asarray(bicubic_resize_weights(grid.shape[1], size[1], antialias=antialias))
  # Full float32 precision: this is a handful of FLOPs, and accelerators default to less.
  return jnp.einsum("Rr,Cc,rcd->RCd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)


def resize_position_table(pos: jax.Array, grid: tuple[int, int], size: tuple[int, int], *,
                          antialias: bool) -> jax.Array:
  """A (1, 1 + patches, hidden) position table, CLS row first, for another patch grid: the patch
  rows, laid out as ``grid``, resized bicubically to ``size`` in float32 (as torch does), the CLS
  row kept."""
  patches = pos[0, 1:].reshape(*grid, pos.shape[-1]).astype(jnp.float32)
  resized = resize_grid(patches, size, antialias=antialias).astype(pos.dtype)
  return jnp.concatenate([pos[:, :1], resized.reshape(1, -1, pos.shape[-1])], axis=1)


def _layer_norm(config: VitConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """A LayerNorm over the hidden axis, computed like torch's."""
  # use_fast_variance=False: E[x^2] - E[x]^2 loses precision that torch's LayerNorm keeps.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False,
                       dtype=dtype, param_dtype=dtype, rngs=rngs)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
            impl: str = "auto", mask: jax.Array | None = None) -> jax.Array:
  """Multi-head attention of (b, tq, d) queries over (b, tk, d) keys and values; ``impl`` is an
  ``attention_impl`` (``vlmsel_jax.models.attention``). ``mask``: None (every key visible) or
  (b, tk) bool, True for the keys every query may attend to (NaFlex's padding mask)."""
  b, tq, d = q.shape
  tk = k.shape[1]
  dh = d // num_heads
  key_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
  if attention.resolve(impl) == "fused":
    out = attention.fused(q.reshape(b, tq, num_heads, dh), k.reshape(b, tk, num_heads, dh),
                          v.reshape(b, tk, num_heads, dh), key_mask, scale=dh ** -0.5)
    return out.reshape(b, tq, d)
  # Heads moved ahead of tokens once, so both products are plain batched matmuls over
  # (b, heads): XLA:CPU ran the einsum form, which leaves the layout to it, slower
  # (benchmarks/README.md).
  # The 1/sqrt(dh) scale goes on q, a tq/tk-th of the scores' size.
  q = (q * (dh ** -0.5)).reshape(b, tq, num_heads, dh).transpose(0, 2, 1, 3)
  k = k.reshape(b, tk, num_heads, dh).transpose(0, 2, 3, 1)
  v = v.reshape(b, tk, num_heads, dh).transpose(0, 2, 1, 3)
  scores = jnp.matmul(q, k).astype(jnp.float32)
  if key_mask is not None:
    # The most negative float rather than -inf, as transformers does (see models.attention).
    scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, tq, d)


class Attention(nnx.Module):
  """Multi-head self-attention over all tokens (no mask: every token sees every token)."""

  def __init__(self, config: VitConfig, *, dtype: Any, rngs: nnx.Rngs):
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.q_proj = nnx.Linear(d, d, use_bias=config.qkv_bias, **kw)
    self.k_proj = nnx.Linear(d, d, use_bias=config.qkv_bias, **kw)
    self.v_proj = nnx.Linear(d, d, use_bias=config.qkv_bias, **kw)
    self.o_proj = nnx.Linear(d, d, **kw)
    self.num_heads = config.num_heads
    self.attention_impl = config.attention_impl

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    out = _attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads,
                  self.attention_impl, mask)
    return self.o_proj(out)


class MLP(nnx.Module):
  """Feed-forward block: fc2(act(fc1(x)))."""

  def __init__(self, config: VitConfig, *, dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
    self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)
    self.hidden_act = config.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class SwiGLU(nnx.Module):
  """DINOv2's SwiGLU block: down(silu(a) * b), with a and b the halves of one fused projection."""

  def __init__(self, config: VitConfig, *, dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    # Fused like the checkpoint's weights_in, so the table maps one tensor to one parameter.
    self.gate_up_proj = nnx.Linear(config.hidden_size, 2 * config.intermediate_size, **kw)
    self.down_proj = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    return self.down_proj(jax.nn.silu(gate) * up)


class EncoderLayer(nnx.Module):
  """Pre-norm layer: h = x + ls1 * attn(norm1(x)), then h + ls2 * mlp(norm2(h)).

  The layer scales ``ls1`` / ``ls2`` are DINOv2's; the other variants have none.
  """

  def __init__(self, config: VitConfig, *, dtype: Any, rngs: nnx.Rngs):
    d = config.hidden_size
    self.norm1 = _layer_norm(config, dtype, rngs)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(config, dtype, rngs)
    self.mlp = (SwiGLU if config.swiglu else MLP)(config, dtype=dtype, rngs=rngs)
    has_scale = config.variant == "dinov2"
    self.layer_scale1 = nnx.Param(jnp.ones((d,), dtype)) if has_scale else None
    self.layer_scale2 = nnx.Param(jnp.ones((d,), dtype)) if has_scale else None

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    h = self.attn(self.norm1(x), mask)
    if self.layer_scale1 is not None:
      h = h * self.layer_scale1[...]
    x = x + h
    h = self.mlp(self.norm2(x))
    if self.layer_scale2 is not None:
      h = h * self.layer_scale2[...]
    return x + h


class AttentionPoolingHead(nnx.Module):
  """SigLIP's pooling head: a learned probe attends over all tokens, then a residual MLP.

  The attention is torch's ``nn.MultiheadAttention``, whose q/k/v projections are one fused
  (3 * hidden, hidden) ``in_proj`` weight; it is kept fused here, like the checkpoint.
  """

  def __init__(self, config: VitConfig, *, dtype: Any, rngs: nnx.Rngs):
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.probe = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (1, 1, d), dtype))
    self.in_proj = nnx.Linear(d, 3 * d, **kw)
    self.out_proj = nnx.Linear(d, d, **kw)
    self.norm = _layer_norm(config, dtype, rngs)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)
    self.num_heads = config.num_heads
    self.attention_impl = config.attention_impl

  def _project(self, x: jax.Array, part: int) -> jax.Array:
    """Applies the q (0), k (1) or v (2) slice of the fused input projection."""
    d = x.shape[-1]
    kernel = self.in_proj.kernel[...][:, part * d:(part + 1) * d]
    bias = self.in_proj.bias[...][part * d:(part + 1) * d]
    return jnp.dot(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    h = _attend(self._project(probe, 0), self._project(x, 1), self._project(x, 2),
                self.num_heads, self.attention_impl, mask)
    h = self.out_proj(h)
    h = h + self.mlp(self.norm(h))
    return h[:, 0]


@struct.dataclass
class VitOutput:
  """What ``Vit.__call__`` returns; a pytree, so it passes through ``jax.jit``.

  Attributes:
    last_hidden_state: (batch, tokens, hidden), exactly transformers' ``last_hidden_state``:
      the last layer's output, after the final LayerNorm for SigLIP, DINOv2 and ViT; CLIP has
      none (its ``post_layernorm`` only touches the pooled token).
    hidden_states: ``num_layers + 1`` arrays (batch, tokens, hidden), exactly transformers'
      ``output_hidden_states=True``: the embeddings (for CLIP after ``pre_layrnorm``), then every
      layer's output; the last one is *before* any final LayerNorm.
    pooler_output: (batch, hidden) for CLIP (``post_layernorm`` of the CLS token), SigLIP (the
      attention-pooling head), DINOv2 (the CLS token of ``last_hidden_state``) and ViT (tanh
      dense layer on that CLS token); None where the model has no pooler.
    num_prefix_tokens: Tokens before the patch tokens (CLS and register tokens).
    grid: (rows, columns) of patch tokens, row-major after the prefix tokens.
    has_class_token: Whether token 0 is a CLS token.
  """

  last_hidden_state: jax.Array
  hidden_states: tuple[jax.Array, ...]
  pooler_output: jax.Array | None
  num_prefix_tokens: int = struct.field(pytree_node=False)
  grid: tuple[int, int] = struct.field(pytree_node=False)
  has_class_token: bool = struct.field(pytree_node=False)


class Vit(nnx.Module):
  """A CLIP / SigLIP / DINOv2 / ViT vision transformer; ``config.variant`` picks which."""

  def __init__(self, config: VitConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    c = config
    d = c.hidden_size
    self._init_patch_embed(c, dtype, rngs, use_bias=c.variant != "clip")
    init = nnx.initializers.normal(0.02)
    # Token and position parameters keep each checkpoint's own shape, so loading copies them as
    # they are: CLIP stores its class token as (hidden,) and, like SigLIP, its positions as an
    # nn.Embedding table (positions, hidden); DINOv2 and ViT store (1, ..., hidden) tensors.
    table_layout = c.variant in ("clip", "siglip")
    cls_shape = (d,) if table_layout else (1, 1, d)
    self.cls_token = (nnx.Param(init(rngs.params(), cls_shape, dtype))
                      if c.has_class_token else None)
    self.register_tokens = (
        nnx.Param(init(rngs.params(), (1, c.num_register_tokens, d), dtype))
        if c.num_register_tokens else None)
    pos_shape = (c.num_positions, d) if table_layout else (1, c.num_positions, d)
    self.pos_embed = nnx.Param(init(rngs.params(), pos_shape, dtype))
    self.pre_norm = _layer_norm(c, dtype, rngs) if c.variant == "clip" else None
    self.layers = nnx.List(
        [EncoderLayer(c, dtype=dtype, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = _layer_norm(c, dtype, rngs) if c.variant != "clip" else None
    self.pooled_norm = _layer_norm(c, dtype, rngs) if c.variant == "clip" else None
    self.head = (AttentionPoolingHead(c, dtype=dtype, rngs=rngs)
                 if c.variant == "siglip" and c.pooler else None)
    self.pooler = (nnx.Linear(d, c.pooler_output_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
                   if c.variant == "vit" and c.pooler else None)

  def _positions(self, height: int, width: int, grid: tuple[int, int]) -> jax.Array:
    """The (1, positions, hidden) position embeddings for an image of ``height`` x ``width``."""
    c = self.config
    pos = self.pos_embed[...].reshape(1, c.num_positions, c.hidden_size)
    if c.variant != "dinov2":
      return pos
    # transformers' Dinov2 condition, verbatim: a square image with the native patch count keeps
    # the table; anything else is resized (also a non-square image with that patch count).
    if grid[0] * grid[1] == c.num_positions - 1 and height == width:
      return pos
    # Resized in float32 whatever the model dtype, as transformers does.
    return resize_position_table(pos, c.grid, grid, antialias=c.antialias_positions)

  def _init_patch_embed(self, config: TowerConfig, dtype: Any, rngs: nnx.Rngs, *,
                        use_bias: bool = True) -> None:
    """Sets ``config``, ``dtype`` and the strided patch convolution."""
    c = config
    self.config = c
    self.dtype = jnp.dtype(dtype)
    self.patch_embed = nnx.Conv(c.num_channels, c.hidden_size, kernel_size=c.patch_size,
                                strides=c.patch_size, padding="VALID", use_bias=use_bias,
                                dtype=dtype, param_dtype=dtype, rngs=rngs)

  def _init_class_token_stem(self, config: TowerConfig, dtype: Any, rngs: nnx.Rngs, *,
                             pos_embed: bool = True) -> None:
    """Sets ``config``, ``dtype`` and the stem of a tower with one CLS token: the patch
    convolution (with bias), the (1, 1, hidden) CLS token and, with ``pos_embed``, the
    (1, positions, hidden) position table. ``Vit``'s own ``__init__`` builds the ViT variants'
    stems; towers that reuse this class's methods build theirs here."""
    c = config
    d = c.hidden_size
    self._init_patch_embed(c, dtype, rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), dtype))
    self.pos_embed = (nnx.Param(init(rngs.params(), (1, c.num_positions, d), dtype))
                      if pos_embed else None)

  def _check_pixels(self, pixel_values: jax.Array) -> tuple[int, int, int]:
    """(batch, height, width) of NHWC ``pixel_values``, after checking they have that layout
    and ``config.num_channels`` channels."""
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
      raise ValueError(f"pixel_values must be NHWC (batch, height, width, {c.num_channels}); "
                       f"got shape {tuple(pixel_values.shape)}")
    return pixel_values.shape[:3]

  def _run_layers(self, x: jax.Array, block_offsets: Sequence[jax.Array] | None, *args: Any,
                  unit: str = "encoder layers") -> list[jax.Array]:
    """Runs every layer (``layer(x, *args)``, rematerialized with ``config.remat``) on ``x``,
    adding ``block_offsets[i]`` to layer i's output; returns the input then every output.

    Raises:
      ValueError: ``block_offsets`` has not one array per layer (``unit`` names the layers).
    """
    if block_offsets is not None and len(block_offsets) != len(self.layers):
      raise ValueError(f"block_offsets has {len(block_offsets)} arrays for "
                       f"{len(self.layers)} {unit}")
    hidden = [x]
    for i, layer in enumerate(self.layers):
      x = attention.remat_call(self.config.remat, layer, x, *args)
      if block_offsets is not None:
        x = x + block_offsets[i]
      hidden.append(x)
    return hidden

  def _embed_patches(self, pixels: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """The strided patch convolution as one matmul over flattened patches: (b, patches, d).

    Same parameters and result as ``self.patch_embed(pixels)`` (a VALID convolution whose
    stride is its kernel drops the pixels past the last whole patch, and so does the crop);
    XLA:CPU runs the matmul faster than its convolution (benchmarks/README.md).
    """
    (ph, pw), (gh, gw) = self.config.patch_size, grid
    b, c = pixels.shape[0], pixels.shape[-1]
    patches = pixels[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, ph * pw * c)
    kernel = self.patch_embed.kernel[...]
    x = patches @ kernel.reshape(ph * pw * c, kernel.shape[-1])
    if self.patch_embed.bias is not None:
      x = x + self.patch_embed.bias[...]
    return x

  # The vision-tower protocol the VLM and the C score use (``vlm.tower_grid``,
  # ``features.patch_grid``): the default patch-grid layer, and the grid at a layer.
  GRID_DEFAULT_LAYER = -2

  def patch_grid(self, pixels: jax.Array, layer: int) -> jax.Array:
    """(batch, rows, cols, dim) patch tokens at ``layer`` (no CLS / register tokens)."""
    return select_features(self(pixels), layer, "patch_grid")

  def __call__(self, pixel_values: jax.Array,
               block_offsets: Sequence[jax.Array] | None = None) -> VitOutput:
    """Runs the vision transformer on a batch of images.

    Args:
      pixel_values: (batch, height, width, channels) preprocessed images, NHWC. CLIP, SigLIP and
        ViT need the native ``config.image_size``; DINOv2 takes any size of at least one patch
        (its position embeddings are resized like transformers does).
      block_offsets: Optional, one array per encoder layer, each broadcastable to that layer's
        output (batch, tokens, hidden): added to the layer's output before anything reads it.
        Zeros leave every output unchanged; the gradient with respect to offset ``l`` at zero is
        the gradient with respect to layer ``l``'s output, which is how layer attributions
        (``vlmsel_jax.selection.conductance``) reach inside the model.

    Returns:
      A ``VitOutput`` with all hidden states, ``last_hidden_state`` and ``pooler_output``.

    Raises:
      ValueError: the shape is not NHWC with ``config.num_channels`` channels, or the size is
        not one the model accepts.
    """
    c = self.config
    b, height, width = self._check_pixels(pixel_values)
    if c.variant != "dinov2" and (height, width) != c.image_size:
      raise ValueError(f"input image size ({height}*{width}) does not match the model's "
                       f"({c.image_size[0]}*{c.image_size[1]}); only DINOv2 resizes its "
                       "position embeddings")
    grid = (height // c.patch_size[0], width // c.patch_size[1])
    if not grid[0] or not grid[1]:
      raise ValueError(f"input image size ({height}*{width}) is smaller than one patch "
                       f"{c.patch_size}")
    d = c.hidden_size

    x = self._embed_patches(pixel_values.astype(self.dtype), grid)
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].reshape(1, 1, d), (b, 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self._positions(height, width, grid)
    if self.register_tokens is not None:
      # Registers carry no position embedding: they go in after the positions are added.
      registers = jnp.broadcast_to(self.register_tokens[...], (b, c.num_register_tokens, d))
      x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    hidden, last, pooled = self._encode(x, block_offsets)
    return VitOutput(last_hidden_state=last, hidden_states=hidden, pooler_output=pooled,
                     num_prefix_tokens=c.num_prefix_tokens, grid=grid,
                     has_class_token=c.has_class_token)

  def _encode(self, x: jax.Array, block_offsets: Sequence[jax.Array] | None = None,
              mask: jax.Array | None = None
              ) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array | None]:
    """The encoder layers, final norm and pooling on (batch, tokens, hidden) embeddings.

    Args:
      x: The embeddings (after any ``pre_norm``).
      block_offsets: As in ``__call__``.
      mask: None, or (batch, tokens) bool: the keys every attention (the pooling head's too) may
        see; padding tokens are still computed, as transformers' are.

    Returns:
      (hidden_states, last_hidden_state, pooler_output), as ``VitOutput`` holds them.
    """
    c = self.config
    masks = () if mask is None else (mask,)
    hidden = self._run_layers(x, block_offsets, *masks)
    x = hidden[-1]

    pooled = None
    if c.variant == "clip":
      last = x
      pooled = self.pooled_norm(x[:, 0])
    else:
      last = self.final_norm(x)
      if self.head is not None:
        pooled = self.head(last, *masks)
      elif self.pooler is not None:
        pooled = jnp.tanh(self.pooler(last[:, 0]))
      elif c.variant == "dinov2":
        pooled = last[:, 0]
    return tuple(hidden), last, pooled


def select_features(output: VitOutput, layer: int | None = -1,
                    pooling: str = "cls") -> jax.Array:
  """Picks one image representation out of a ``VitOutput``; jittable (``layer`` and ``pooling``
  static).

  Args:
    output: What ``Vit.__call__`` returned.
    layer: Index into ``output.hidden_states`` (``-1``: the last layer's output, before any final
      LayerNorm; ``-2``: the second to last, LLaVA's choice for CLIP), or None for
      ``output.last_hidden_state``. Must stay at its default for ``pooling="pooler"``.
    pooling: ``"cls"``: the CLS token (batch, hidden); ``"mean"``: the mean of the patch tokens
      (batch, hidden); ``"patch_grid"``: the patch tokens as (batch, rows, columns, hidden);
      ``"pooler"``: ``output.pooler_output``. CLS and register tokens never enter "mean" or
      "patch_grid".

  Raises:
    ValueError: an unknown pooling, "cls" on a model without CLS token (SigLIP), "pooler" on a
      model without pooler, or a ``layer`` given with "pooler".
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
  if pooling == "pooler":
    if layer != -1:
      raise ValueError("pooling='pooler' reads pooler_output, which has no layer; leave layer "
                       "at its default")
    if output.pooler_output is None:
      raise ValueError("this model has no pooler_output")
    return output.pooler_output
  h = output.last_hidden_state if layer is None else output.hidden_states[layer]
  if pooling == "cls":
    if not output.has_class_token:
      raise ValueError("this model has no CLS token; use pooling 'mean', 'patch_grid' or "
                       "'pooler'")
    return h[:, 0]
  patches = h[:, output.num_prefix_tokens:]
  if pooling == "mean":
    return jnp.mean(patches, axis=1)
  return patches.reshape(h.shape[0], *output.grid, h.shape[-1])
