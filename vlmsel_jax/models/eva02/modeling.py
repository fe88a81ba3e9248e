"""EVA-02 vision transformers (timm's ``eva02_{tiny,small,base,large}_patch14_*``) in Flax NNX.

An EVA-02 is a pre-norm ViT with a CLS token and learned absolute position embeddings, plus:

* 2-D rotary position embeddings on the patch tokens' queries and keys (timm's
  ``RotaryEmbeddingCat``, ``in_pixels=False``: per head, the first half of the rotated channels
  follow the patch row, the second half its column; positions are rescaled to the pre-training
  grid ``ref_feat_shape``; sin / cos interleaved, pairs (2i, 2i+1) rotated together);
* a SwiGLU MLP: for tiny / small timm's packed ``GluMlp`` (``vit.SwiGLU``: one fused projection,
  the gate first), for base / large ``SwiGLU`` with separate gate and value projections and a
  LayerNorm on the hidden units before the output projection (sub-LN, ``scale_mlp``);
* queries and values with a bias, keys without: tiny / small keep q/k/v fused in one ``qkv``
  weight with separate ``q_bias`` / ``v_bias`` vectors; base / large have three projections;
* average pooling of the patch tokens followed by ``fc_norm`` as the image embedding (timm's
  ``global_pool='avg'``), or a final ``norm`` and the CLS token (``'token'``).

``Eva02Config.from_timm`` reads the ``config.json`` of a timm Hub directory (``architecture``,
``model_args``, ``pretrained_cfg``): the architecture's shape comes from ``ARCHITECTURES``, timm's
``eva02_*`` definitions, overridden by ``model_args``. Images are NHWC at the model's size only
(timm's default ``dynamic_img_size=False``); ``Eva02.with_image_size`` builds the tower for another
size as timm does (the zoo's ``@res=``). The numerics follow timm's torch implementation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.models.vit import modeling as vit

_COMMON = dict(patch_size=14, mlp_ratio=4 * 2 / 3, ref_feat_shape=(16, 16))
_TINY = dict(embed_dim=192, depth=12, num_heads=3, qkv_fused=True, scale_mlp=False)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6, qkv_fused=True, scale_mlp=False)
_BASE = dict(embed_dim=768, depth=12, num_heads=12, qkv_fused=False, scale_mlp=True)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16, qkv_fused=False, scale_mlp=True)

# timm's eva02 image towers (timm/models/eva.py), the arguments each passes to ``Eva``. The
# EVA-02-CLIP towers (``eva02_*_clip_*``) differ (attention sub-LN, other pooling) and are not
# here.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "eva02_tiny_patch14_224": dict(_COMMON, img_size=224, **_TINY),
    "eva02_tiny_patch14_336": dict(_COMMON, img_size=336, **_TINY),
    "eva02_small_patch14_224": dict(_COMMON, img_size=224, **_SMALL),
    "eva02_small_patch14_336": dict(_COMMON, img_size=336, **_SMALL),
    "eva02_base_patch14_224": dict(_COMMON, img_size=224, **_BASE),
    "eva02_base_patch14_448": dict(_COMMON, img_size=448, **_BASE),
    "eva02_large_patch14_224": dict(_COMMON, img_size=224, **_LARGE),
    "eva02_large_patch14_448": dict(_COMMON, img_size=448, **_LARGE),
}

# ``Eva`` constructor defaults the eva02 definitions keep.
_EVA_DEFAULTS: dict[str, Any] = dict(in_chans=3, num_classes=1000, global_pool="avg",
                                     qkv_bias=True, use_fc_norm=None,
                                     use_post_transformer_norm=None, rope_temperature=10000.0,
                                     rope_grid_offset=0.0, rope_grid_indexing="ij")

# model_args a checkpoint may override: the shape, the pooling and the rope grid. Dropout rates
# do nothing at inference. Any other argument builds a model this implementation does not have.
_OVERRIDABLE = frozenset(ARCHITECTURES["eva02_tiny_patch14_224"]) | frozenset(_EVA_DEFAULTS) | {
    "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
    "patch_drop_rate"}
# Arguments that must keep the value every EVA-02 has.
_FIXED = {"swiglu_mlp": True, "use_rot_pos_emb": True, "use_abs_pos_emb": True,
          "class_token": True, "num_reg_tokens": 0, "no_embed_class": False,
          "scale_attn_inner": False, "qk_norm": False, "init_values": None,
          "use_post_norm": False, "use_pre_transformer_norm": False, "rope_type": "cat",
          "rope_rotate_half": False, "dynamic_img_size": False, "attn_type": "eva",
          "swiglu_align_to": 0, "gated_attn": False, "num_kv_heads": None}
GLOBAL_POOLS = ("avg", "token", "")


def architecture_name(config: Mapping[str, Any]) -> str:
  """The timm architecture of a timm ``config.json``, without a pretrained tag (``.mim_in22k``)."""
  return str(config.get("architecture", "")).split(".", 1)[0]


def is_eva02(config: Mapping[str, Any]) -> bool:
  """Whether a timm ``config.json`` names one of the EVA-02 image towers of ``ARCHITECTURES``."""
  return architecture_name(config) in ARCHITECTURES


@dataclasses.dataclass(frozen=True)
class Eva02Config(vit.ClassTokenTowerConfig):
  """Architecture hyper-parameters of an EVA-02 tower: ``vit.TowerConfig``'s fields (timm's
  ``embed_dim``, ``int(embed_dim * mlp_ratio)``, ``depth``, ``num_heads`` whose width must be a
  multiple of 4 (two axes of rope pairs), ``img_size``, the only size the model takes, ``in_chans``,
  and timm's ``LayerNorm`` epsilon 1e-6; no ``hidden_act``), plus:

  Attributes:
    architecture: The timm architecture name (a key of ``ARCHITECTURES``).
    qkv_fused: q/k/v in one ``qkv`` weight (tiny, small) or three projections (base, large).
    qkv_bias: Queries and values have biases (keys never do).
    sub_ln: timm's ``scale_mlp``: separate gate / value projections and a LayerNorm on the hidden
      units (base, large); else the packed SwiGLU without norm.
    ref_feat_shape: The pre-training patch grid the rope positions are rescaled to, or None.
    rope_temperature: Rope frequency base.
    rope_grid_offset: Added to every rope grid position.
    rope_grid_indexing: "ij" (first half of the rope channels by row) or "xy" (by column).
    global_pool: "avg" (mean of the patch tokens), "token" (the CLS token) or "" (none).
    fc_norm: A LayerNorm on the pooled embedding (timm's default: on with "avg").
    final_norm: A LayerNorm on the last block's output (timm's default: when no fc_norm).
  """

  architecture: str
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  image_size: tuple[int, int]
  patch_size: tuple[int, int]
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  qkv_fused: bool = True
  qkv_bias: bool = True
  sub_ln: bool = False
  ref_feat_shape: tuple[int, int] | None = (16, 16)
  rope_temperature: float = 10000.0
  rope_grid_offset: float = 0.0
  rope_grid_indexing: str = "ij"
  global_pool: str = "avg"
  fc_norm: bool = True
  final_norm: bool = False
  attention_impl: str = "auto"
  remat: bool = False

  def __post_init__(self):
    self._check_tower()
    if self.ref_feat_shape is not None:
      object.__setattr__(self, "ref_feat_shape", vit._pair(self.ref_feat_shape))  # pylint: disable=protected-access
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
      raise ValueError(f"hidden_size ({self.hidden_size}) must split into {self.num_heads} "
                       "heads whose width is a multiple of 4 (2-D rope)")
    if self.global_pool not in GLOBAL_POOLS:
      raise ValueError(f"global_pool {self.global_pool!r} is not one of "
                       f"{', '.join(repr(p) for p in GLOBAL_POOLS)}")
    if self.rope_grid_indexing not in ("ij", "xy"):
      raise ValueError(f"rope_grid_indexing {self.rope_grid_indexing!r} is not 'ij' or 'xy'")
    self._check_image_fits()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def pooler(self) -> bool:
    """Whether ``pooler_output`` (timm's pre-logits) exists: every pooling but ""."""
    return self.global_pool != ""

  @classmethod
  def from_timm(cls, config: Mapping[str, Any]) -> Eva02Config:
    """Reads a timm Hub ``config.json`` (``architecture`` + ``model_args``).

    Raises:
      ValueError: an architecture other than the EVA-02 towers of ``ARCHITECTURES``, or a
        ``model_args`` entry this implementation cannot build (named in the message).
    """
    name = architecture_name(config)
    if name not in ARCHITECTURES:
      raise ValueError(f"timm architecture {config.get('architecture')!r} is not supported; "
                       f"supported: {', '.join(ARCHITECTURES)}")
    model_args = dict(config.get("model_args") or {})
    for key, value in model_args.items():
      if key in _FIXED:
        if value != _FIXED[key]:
          raise ValueError(f"{name}: model_args {key}={value!r} is not supported (EVA-02 has "
                           f"{_FIXED[key]!r})")
      elif key not in _OVERRIDABLE:
        raise ValueError(f"{name}: model_args {key!r} is not supported; supported: "
                         f"{', '.join(sorted(_OVERRIDABLE))}")
    a = {**_EVA_DEFAULTS, **ARCHITECTURES[name], **model_args}
    fc_norm = a["global_pool"] == "avg" if a["use_fc_norm"] is None else bool(a["use_fc_norm"])
    final_norm = (not fc_norm if a["use_post_transformer_norm"] is None
                  else bool(a["use_post_transformer_norm"]))
    ref = a["ref_feat_shape"]
    return cls(
        architecture=name, hidden_size=int(a["embed_dim"]),
        intermediate_size=int(a["embed_dim"] * a["mlp_ratio"]), num_layers=int(a["depth"]),
        num_heads=int(a["num_heads"]), image_size=vit._pair(a["img_size"]),  # pylint: disable=protected-access
        patch_size=vit._pair(a["patch_size"]), num_channels=int(a["in_chans"]),  # pylint: disable=protected-access
        qkv_fused=bool(a["qkv_fused"]), qkv_bias=bool(a["qkv_bias"]),
        sub_ln=bool(a["scale_mlp"]), ref_feat_shape=None if ref is None else vit._pair(ref),  # pylint: disable=protected-access
        rope_temperature=float(a["rope_temperature"]),
        rope_grid_offset=float(a["rope_grid_offset"]),
        rope_grid_indexing=a["rope_grid_indexing"], global_pool=a["global_pool"],
        fc_norm=fc_norm, final_norm=final_norm)


def rope_table(config: Eva02Config) -> tuple[np.ndarray, np.ndarray]:
  """(sin, cos), each (patches, head_dim) float32: timm's ``RotaryEmbeddingCat`` at the native
  grid, computed step by step as timm does in float32.

  Per axis, ``head_dim // 4`` frequencies ``1 / temperature ** (i / (head_dim // 4))``; the grid
  positions (``arange + grid_offset``, rescaled by ``ref_feat_shape / grid``) times each
  frequency, the row axis's angles first (``"ij"``), each angle repeated twice (interleaved
  pairs).
  """
  f32 = np.float32
  num_bands = config.head_dim // 4
  exponent = np.arange(num_bands, dtype=np.int64).astype(f32) / f32(num_bands)
  bands = (f32(1.0) / np.power(f32(config.rope_temperature), exponent)).astype(f32)
  shape = list(config.grid)
  ref = None if config.ref_feat_shape is None else list(config.ref_feat_shape)
  if config.rope_grid_indexing == "xy":
    shape = shape[::-1]
    ref = None if ref is None else ref[::-1]
  axes = [np.arange(s, dtype=np.int64).astype(f32) + f32(config.rope_grid_offset) for s in shape]
  if ref is not None:
    axes = [(t / f32(s) * f32(r)).astype(f32) for t, s, r in zip(axes, shape, ref)]
  grid = np.stack(np.meshgrid(*axes, indexing=config.rope_grid_indexing), axis=-1)
  angles = (grid[..., None] * bands).astype(f32)  # (*grid, 2, num_bands)
  n = config.grid[0] * config.grid[1]
  sin = np.repeat(np.sin(angles).reshape(n, -1), 2, axis=-1)
  cos = np.repeat(np.cos(angles).reshape(n, -1), 2, axis=-1)
  return sin.astype(f32), cos.astype(f32)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """timm's ``apply_rot_embed`` (interleaved): x * cos + rot(x) * sin, rot(x) = (-x1, x0, ...).

  ``x`` is (batch, patches, heads, head_dim); the product is in float32, cast back to x's dtype.
  """
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  sin, cos = sin[None, :, None, :], cos[None, :, None, :]
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Eva02Attention(nnx.Module):
  """Self-attention with rope on the patch tokens; q and v biased, k not."""

  def __init__(self, config: Eva02Config, *, dtype: Any, rngs: nnx.Rngs):
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    zeros = nnx.initializers.zeros
    if config.qkv_fused:
      # Kept fused like the checkpoint's ``qkv`` weight, so the table maps one tensor to one
      # parameter; its biases are the separate q_bias and v_bias vectors.
      self.qkv = nnx.Linear(d, 3 * d, use_bias=False, **kw)
      self.q_bias = nnx.Param(zeros(rngs.params(), (d,), dtype)) if config.qkv_bias else None
      self.v_bias = nnx.Param(zeros(rngs.params(), (d,), dtype)) if config.qkv_bias else None
      self.q_proj = self.k_proj = self.v_proj = None
    else:
      self.qkv = self.q_bias = self.v_bias = None
      self.q_proj = nnx.Linear(d, d, use_bias=config.qkv_bias, **kw)
      self.k_proj = nnx.Linear(d, d, use_bias=False, **kw)
      self.v_proj = nnx.Linear(d, d, use_bias=config.qkv_bias, **kw)
    self.o_proj = nnx.Linear(d, d, **kw)
    self.num_heads = config.num_heads
    self.attention_impl = config.attention_impl

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    if self.qkv is None:
      return self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    if self.q_bias is not None:
      q = q + self.q_bias[...].astype(q.dtype)
      v = v + self.v_bias[...].astype(v.dtype)
    return q, k, v

  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = self._qkv(x)

    def rotate(y):
      # The CLS token (position 0) is not rotated.
      heads = y.reshape(b, t, self.num_heads, d // self.num_heads)
      rotated = apply_rope(heads[:, 1:], sin, cos)
      return jnp.concatenate([heads[:, :1], rotated], axis=1).reshape(b, t, d)

    out = vit._attend(rotate(q), rotate(k), v, self.num_heads, self.attention_impl)  # pylint: disable=protected-access
    return self.o_proj(out)


class SubLnSwiGLU(nnx.Module):
  """timm's ``SwiGLU`` with ``norm_layer``: fc2(norm(silu(fc1_g(x)) * fc1_x(x)))."""

  def __init__(self, config: Eva02Config, *, dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    h = config.intermediate_size
    self.gate_proj = nnx.Linear(config.hidden_size, h, **kw)
    self.up_proj = nnx.Linear(config.hidden_size, h, **kw)
    self.norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw)
    self.down_proj = nnx.Linear(h, config.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.norm(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)))


class Eva02Block(nnx.Module):
  """Pre-norm block: x + attn(norm1(x), rope), then + mlp(norm2(.)); no layer scale."""

  def __init__(self, config: Eva02Config, *, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = vit._layer_norm(config, dtype, rngs)  # pylint: disable=protected-access
    self.attn = Eva02Attention(config, dtype=dtype, rngs=rngs)
    self.norm2 = vit._layer_norm(config, dtype, rngs)  # pylint: disable=protected-access
    # The packed GluMlp of tiny / small is DINOv2's SwiGLU: one projection, gate half first.
    self.mlp = (SubLnSwiGLU(config, dtype=dtype, rngs=rngs) if config.sub_ln
                else vit.SwiGLU(config, dtype=dtype, rngs=rngs))

  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), sin, cos)
    return x + self.mlp(self.norm2(x))


class Eva02(vit.Vit):
  """An EVA-02 tower; returns a ``vit.VitOutput`` (``vit.select_features`` reads it).

  A ``vit.Vit`` for its patch embedding and the vision-tower protocol (``patch_grid``).
  """

  def __init__(self, config: Eva02Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    # Vit's __init__ builds the ViT variants' pieces; the inherited methods need only config,
    # dtype and patch_embed.
    c = config
    self._init_class_token_stem(c, dtype, rngs)
    self.layers = nnx.List([Eva02Block(c, dtype=dtype, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = vit._layer_norm(c, dtype, rngs) if c.final_norm else None  # pylint: disable=protected-access
    self.fc_norm = vit._layer_norm(c, dtype, rngs) if c.fc_norm else None  # pylint: disable=protected-access

  def with_image_size(self, image_size: tuple[int, int]) -> Eva02:
    """This tower for ``image_size`` inputs, as timm builds it at another ``img_size``
    (``create_model(..., img_size=)`` with pretrained weights, or ``set_input_size``).

    The patch position table is resampled to the new grid (torch's antialiased bicubic, in
    float32, timm's ``resample_abs_pos_embed``), the CLS position kept; the rope grid follows
    the new grid, still rescaled to ``ref_feat_shape``. The weights are shared with this model.

    Raises:
      ValueError: a size smaller than one patch.
    """
    c = dataclasses.replace(self.config, image_size=image_size)
    pos = self.pos_embed[...]
    model = nnx.clone(self)
    model.config = c
    if c.grid == self.config.grid:
      return model  # timm keeps the table when the grid does not change.
    model.pos_embed = nnx.Param(
        vit.resize_position_table(pos, self.config.grid, c.grid, antialias=True))
    return model

  def __call__(self, pixel_values: jax.Array,
               block_offsets: Sequence[jax.Array] | None = None) -> vit.VitOutput:
    """Runs the tower on a batch of NHWC images of ``config.image_size``.

    Args:
      pixel_values: (batch, height, width, channels) preprocessed images.
      block_offsets: As in ``vit.Vit.__call__``: one array per block added to its output.

    Returns:
      ``VitOutput``: ``hidden_states`` are the embeddings (patches + CLS + positions) then every
      block's output (timm's ``forward_intermediates``), ``last_hidden_state`` timm's
      ``forward_features`` (the last block's output, after ``norm`` where the model has one),
      ``pooler_output`` timm's pre-logits ``forward_head(pre_logits=True)`` (None without
      pooling).

    Raises:
      ValueError: not NHWC with ``num_channels`` channels, another size than the native one, or
        ``block_offsets`` of the wrong length.
    """
    c = self.config
    b, height, width = self._check_pixels(pixel_values)
    if (height, width) != c.image_size:
      raise ValueError(f"input image size ({height}*{width}) does not match the model's "
                       f"({c.image_size[0]}*{c.image_size[1]}); EVA-02 (like timm without "
                       "dynamic_img_size) takes one size: use with_image_size for another")
    d = c.hidden_size
    x = self._embed_patches(pixel_values.astype(self.dtype), c.grid)
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, d)), x], axis=1)
    x = x + self.pos_embed[...]
    sin, cos = (jnp.asarray(a) for a in rope_table(c))
    hidden = self._run_layers(x, block_offsets, sin, cos, unit="blocks")
    x = hidden[-1]
    last = x if self.final_norm is None else self.final_norm(x)
    pooled = None
    if c.global_pool == "avg":
      pooled = jnp.mean(last[:, 1:], axis=1)
    elif c.global_pool == "token":
      pooled = last[:, 0]
    if pooled is not None and self.fc_norm is not None:
      pooled = self.fc_norm(pooled)
    return vit.VitOutput(last_hidden_state=last, hidden_states=tuple(hidden),
                         pooler_output=pooled, num_prefix_tokens=1, grid=c.grid,
                         has_class_token=True)
