"""EfficientNet-Lite (lite0 .. lite4) image classifiers in Flax NNX, for inference.

EfficientNet-Lite is EfficientNet made friendly to mobile accelerators: no squeeze-and-excitation,
ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels) that do not scale with
the width coefficient. The network is a 3x3 stride-2 stem convolution, seven stages of MBConv
blocks (1x1 expansion, depthwise k x k, 1x1 projection, each followed by BatchNorm; a residual
connection where the block keeps shape), a 1x1 head convolution, a global mean and a linear
classifier.

The architecture and its scaling follow the ``efficientnet_lite_pytorch`` package (itself a port
of TensorFlow's ``efficientnet_lite_builder``), whose state dicts ``params.key_table`` reads.
Convolutions pad like TensorFlow's ``"SAME"``; that package computes the same padding for its
configured ``image_size``, so the two agree exactly at that size. Images are NHWC.

BatchNorm always uses the running statistics: the module is for feature extraction and
classification, not training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

SUPPORTED_MODEL_TYPES = ("efficientnet_lite",)
# The torch class the checkpoints come from.
SUPPORTED_ARCHITECTURES = ("EfficientNet",)
POOLINGS = ("mean", "patch_grid", "logits")

# variant -> (width coefficient, depth coefficient, native resolution), as in
# efficientnet_lite_pytorch.utils.efficientnet_params.
VARIANTS: dict[str, tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage (group of MBConv blocks) before width / depth scaling.

  Attributes:
    num_blocks: Blocks in the stage; only the first strides and changes the channel count.
    kernel_size: Depthwise kernel size.
    stride: Stride of the stage's first block.
    expand_ratio: Hidden width of a block over its input width.
    in_channels: Input channels of the first block.
    out_channels: Output channels of every block.
  """

  num_blocks: int
  kernel_size: int
  stride: int
  expand_ratio: int
  in_channels: int
  out_channels: int


# The unscaled EfficientNet-Lite stages: the package's block strings 'r1_k3_s11_e1_i32_o16', ...
BASE_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# TensorFlow's EfficientNet-Lite evaluation preprocessing (efficientnet_lite_builder.py):
# inception-style normalisation, chosen there "for better post-quantization", and a centre crop
# of image_size / (image_size + 32) of the shorter side. The torch weights are converted from
# those TF checkpoints, so they expect the same input. In [0, 1] pixel units.
MEAN_RGB = (127.0 / 255.0,) * 3
STDDEV_RGB = (128.0 / 255.0,) * 3
CROP_PADDING = 32


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
  """Channels after width scaling, rounded to a multiple of ``divisor`` as the package does.

  Rounds to the nearest multiple, but never more than 10% down.
  """
  if not width_coefficient:
    return filters
  scaled = filters * width_coefficient
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  """Blocks of a stage after depth scaling (rounded up)."""
  if not depth_coefficient:
    return repeats
  return int(math.ceil(depth_coefficient * repeats))


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
  """Hyper-parameters of an EfficientNet-Lite.

  Attributes:
    variant: The named variant the coefficients came from ("lite0" .. "lite4"), or "custom".
    width_coefficient: Channel multiplier of the stages (not of the stem and head).
    depth_coefficient: Block-count multiplier of the stages but the first and last.
    image_size: Native resolution in pixels (square); the torch model pads for this size.
    num_classes: Classifier outputs.
    batch_norm_eps: Epsilon of every BatchNorm (the package's ``batch_norm_epsilon``).
    depth_divisor: Channel counts are rounded to multiples of this.
    model_type: The config dict's model_type.
  """

  variant: str = "lite0"
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  image_size: int = 224
  num_classes: int = 1000
  batch_norm_eps: float = 1e-3
  depth_divisor: int = 8
  model_type: str = "efficientnet_lite"

  def __post_init__(self):
    if self.width_coefficient <= 0 or self.depth_coefficient <= 0:
      raise ValueError(f"width_coefficient ({self.width_coefficient}) and depth_coefficient "
                       f"({self.depth_coefficient}) must be positive")
    if self.num_classes < 1 or self.image_size < 1:
      raise ValueError(f"num_classes ({self.num_classes}) and image_size ({self.image_size}) "
                       "must be positive")

  @classmethod
  def lite(cls, variant: str, **overrides: Any) -> EfficientNetConfig:
    """The config of a named variant ("lite0" .. "lite4"), with any field overridden."""
    name = variant.removeprefix("efficientnet-")
    if name not in VARIANTS:
      raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    width, depth, size = VARIANTS[name]
    fields = dict(variant=name, width_coefficient=width, depth_coefficient=depth,
                  image_size=size)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> EfficientNetConfig:
    """Reads a config dict: ``model_type`` "efficientnet_lite", ``variant`` and overrides.

    ``variant`` ("lite0" or the package's "efficientnet-lite0") gives the coefficients and
    resolution; any other field of this class present in the dict overrides them.

    Raises:
      ValueError: another model_type, an unknown variant or an unknown field.
    """
    c = dict(config)
    model_type = c.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not an EfficientNet-Lite; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    c.pop("architectures", None)
    variant = c.pop("variant", "lite0")
    known = {f.name for f in dataclasses.fields(cls)} - {"variant", "model_type"}
    unknown = sorted(set(c) - known)
    if unknown:
      raise ValueError(f"unknown EfficientNet-Lite config field(s): {', '.join(unknown)}")
    return cls.lite(variant, **c)

  def to_dict(self) -> dict[str, Any]:
    """The config dict ``from_dict`` reads back (and ``loading.load_model`` takes)."""
    d = dataclasses.asdict(self)
    d["architectures"] = list(SUPPORTED_ARCHITECTURES)
    return d

  @property
  def stages(self) -> tuple[StageSpec, ...]:
    """The seven stages after width and depth scaling, as the package builds them.

    The stem and head do not scale, so the first stage keeps its input of 32 channels and its
    single block, and the last stage keeps its single block.
    """
    stages = []
    last = len(BASE_STAGES) - 1
    for i, base in enumerate(BASE_STAGES):
      fixed = i in (0, last)
      stages.append(dataclasses.replace(
          base,
          num_blocks=base.num_blocks if fixed else round_repeats(base.num_blocks,
                                                                 self.depth_coefficient),
          in_channels=(STEM_CHANNELS if i == 0 else
                       round_filters(base.in_channels, self.width_coefficient,
                                     self.depth_divisor)),
          out_channels=round_filters(base.out_channels, self.width_coefficient,
                                     self.depth_divisor)))
    return tuple(stages)

  @property
  def stage_ends(self) -> tuple[int, ...]:
    """Index (into the flat block list) of the last block of each stage."""
    ends, total = [], 0
    for stage in self.stages:
      total += stage.num_blocks
      ends.append(total - 1)
    return tuple(ends)

  @property
  def num_blocks(self) -> int:
    """MBConv blocks in all stages."""
    return sum(s.num_blocks for s in self.stages)


@dataclasses.dataclass(frozen=True)
class PreprocessInfo:
  """How images must be prepared for a variant (TensorFlow's EfficientNet-Lite eval recipe).

  Attributes:
    image_size: Output (square) side in pixels.
    mean: Per-channel RGB mean subtracted, in [0, 1] pixel units.
    std: Per-channel RGB standard deviation divided by, in [0, 1] pixel units.
    crop_fraction: Side of the centre crop over the image's shorter side, taken before resizing.
    resample: Resize filter.
  """

  image_size: int
  mean: tuple[float, float, float] = MEAN_RGB
  std: tuple[float, float, float] = STDDEV_RGB
  crop_fraction: float = 0.875
  resample: str = "bicubic"


def preprocess_info(config: EfficientNetConfig) -> PreprocessInfo:
  """The preprocessing ``config``'s weights expect."""
  size = config.image_size
  return PreprocessInfo(image_size=size, crop_fraction=size / (size + CROP_PADDING))


def preprocess(images: jax.Array, info: PreprocessInfo) -> jax.Array:
  """Centre-crops, resizes and normalises RGB images into model input.

  Args:
    images: (height, width, 3) or (batch, height, width, 3) RGB, uint8 in [0, 255] or float in
      [0, 1].
    info: What ``preprocess_info`` returns for the model.

  Returns:
    (batch, image_size, image_size, 3) float32, NHWC.
  """
  x = jnp.asarray(images)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"images must be (height, width, 3) or (batch, height, width, 3); got "
                     f"shape {tuple(x.shape)}")
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  b, h, w, _ = x.shape
  crop = max(1, int(info.crop_fraction * min(h, w)))
  # TensorFlow's offsets: the extra pixel of an odd margin goes to the bottom / right.
  top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
  x = x[:, top:top + crop, left:left + crop]
  x = jax.image.resize(x, (b, info.image_size, info.image_size, 3), method=info.resample,
                       antialias=True)
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)
  return (x - mean) / std


def _batch_norm(features: int, config: EfficientNetConfig, dtype: Any,
                rngs: nnx.Rngs) -> nnx.BatchNorm:
  """An inference-mode BatchNorm (running statistics) with the config's epsilon."""
  return nnx.BatchNorm(features, use_running_average=True, epsilon=config.batch_norm_eps,
                       dtype=dtype, param_dtype=dtype, rngs=rngs)


def _conv(cin: int, cout: int, kernel: int, dtype: Any, rngs: nnx.Rngs, *, stride: int = 1,
          groups: int = 1) -> nnx.Conv:
  """A bias-free convolution with TensorFlow "SAME" padding (the extra pixel after)."""
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding="SAME",
                  feature_group_count=groups, use_bias=False, dtype=dtype, param_dtype=dtype,
                  rngs=rngs)


DEPTHWISE_IMPLS = ("auto", "shifts", "conv")


class DepthwiseConv(nnx.Module):
  """A bias-free depthwise k x k convolution with TensorFlow "SAME" padding.

  The kernel is stored as ``nnx.Conv`` stores a grouped convolution's, (k, k, 1, channels), so
  checkpoints map to it unchanged. ``impl``: ``conv`` is XLA's grouped convolution; ``shifts``
  sums k² strided, shifted slices of the padded input times one weight per channel, the same
  arithmetic in another order (outputs agree to float32 rounding). XLA's CPU backend runs grouped
  convolutions much slower than the shifted sums (benchmarks/README.md), so ``auto`` (default)
  picks ``shifts`` on CPU and ``conv`` on accelerators.
  """

  def __init__(self, channels: int, kernel: int, *, stride: int, dtype: Any, rngs: nnx.Rngs,
               impl: str = "auto"):
    if impl not in DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise impl {impl!r} is not one of {', '.join(DEPTHWISE_IMPLS)}")
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, channels), dtype))
    self.stride = stride
    self.impl = impl

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(x.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "shifts" if jax.default_backend() == "cpu" else "conv"
    if impl == "conv":
      return jax.lax.conv_general_dilated(
          x, kernel, (self.stride, self.stride), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
    k, s = kernel.shape[0], self.stride
    _, h, w, _ = x.shape
    out_h, out_w = -(-h // s), -(-w // s)
    # "SAME": the total padding (out - 1) * s + k - in, the extra pixel after.
    pad_h, pad_w = max((out_h - 1) * s + k - h, 0), max((out_w - 1) * s + k - w, 0)
    x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                    (0, 0)))
    out = None
    for i in range(k):
      for j in range(k):
        tap = x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :] * kernel[i, j, 0]
        out = tap if out is None else out + tap
    return out


class MBConv(nnx.Module):
  """Mobile inverted bottleneck: [1x1 expand, BN, ReLU6], depthwise, BN, ReLU6, 1x1, BN, +x."""

  def __init__(self, cin: int, cout: int, *, kernel_size: int, stride: int, expand_ratio: int,
               config: EfficientNetConfig, dtype: Any, rngs: nnx.Rngs):
    hidden = cin * expand_ratio
    if expand_ratio != 1:
      self.expand_conv = _conv(cin, hidden, 1, dtype, rngs)
      self.expand_bn = _batch_norm(hidden, config, dtype, rngs)
    else:
      self.expand_conv = None
      self.expand_bn = None
    self.depthwise_conv = DepthwiseConv(hidden, kernel_size, stride=stride, dtype=dtype,
                                        rngs=rngs)
    self.depthwise_bn = _batch_norm(hidden, config, dtype, rngs)
    self.project_conv = _conv(hidden, cout, 1, dtype, rngs)
    self.project_bn = _batch_norm(cout, config, dtype, rngs)
    self.residual = stride == 1 and cin == cout

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x
    if self.expand_conv is not None:
      h = jax.nn.relu6(self.expand_bn(self.expand_conv(h)))
    h = jax.nn.relu6(self.depthwise_bn(self.depthwise_conv(h)))
    h = self.project_bn(self.project_conv(h))
    # No activation after the projection (a linear bottleneck); drop-connect is training-only.
    return h + x if self.residual else h


@struct.dataclass
class EfficientNetOutput:
  """What ``EfficientNetLite.__call__`` returns; a pytree, so it passes through ``jax.jit``.

  Attributes:
    logits: (batch, num_classes) classifier outputs.
    hidden_states: ``num_stages + 1`` NHWC feature maps: the output of each of the seven stages
      (its last block), then the final pre-pool feature map (head 1x1 conv, BN, ReLU6; 1280
      channels), whose spatial mean feeds the classifier.
  """

  logits: jax.Array
  hidden_states: tuple[jax.Array, ...]
  # Every MBConv block's output, block 0 first; filled only when ``block_offsets`` is given
  # (layer conductance attributes through every block).
  block_outputs: tuple[jax.Array, ...] = ()


class EfficientNetLite(nnx.Module):
  """An EfficientNet-Lite classifier; ``config`` picks the variant."""

  def __init__(self, config: EfficientNetConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtype = jnp.dtype(dtype)
    self.stem_conv = _conv(3, STEM_CHANNELS, 3, dtype, rngs, stride=2)
    self.stem_bn = _batch_norm(STEM_CHANNELS, c, dtype, rngs)
    blocks = []
    for stage in c.stages:
      for j in range(stage.num_blocks):
        blocks.append(MBConv(stage.in_channels if j == 0 else stage.out_channels,
                             stage.out_channels, kernel_size=stage.kernel_size,
                             stride=stage.stride if j == 0 else 1,
                             expand_ratio=stage.expand_ratio, config=c, dtype=dtype, rngs=rngs))
    # One flat list, numbered like the checkpoint's ``_blocks.N``; stage_ends marks the stages.
    self.blocks = nnx.List(blocks)
    self.head_conv = _conv(c.stages[-1].out_channels, HEAD_CHANNELS, 1, dtype, rngs)
    self.head_bn = _batch_norm(HEAD_CHANNELS, c, dtype, rngs)
    self.fc = nnx.Linear(HEAD_CHANNELS, c.num_classes, dtype=dtype, param_dtype=dtype, rngs=rngs)

  # The vision-tower protocol (see ``Vit.patch_grid``).
  GRID_DEFAULT_LAYER = -2

  def patch_grid(self, pixels: jax.Array, layer: int) -> jax.Array:
    """(batch, rows, cols, channels): the NHWC map ``hidden_states[layer]``."""
    return self(pixels).hidden_states[layer]

  def __call__(self, pixel_values: jax.Array,
               block_offsets: Sequence[jax.Array] | None = None) -> EfficientNetOutput:
    """Classifies a batch of preprocessed images.

    Args:
      pixel_values: (batch, height, width, 3) images, NHWC, prepared by ``preprocess``. Any size
        runs; at ``config.image_size`` the result equals the torch package's.
      block_offsets: Optional, one array per MBConv block, each broadcastable to that block's
        output and added to it; the output then also holds every block's output. Zeros change
        nothing: differentiating at zero gives the gradient with respect to each block's output
        (``selection.conductance``).

    Returns:
      An ``EfficientNetOutput`` with the logits and every stage's feature map.

    Raises:
      ValueError: the input is not NHWC with 3 channels.
    """
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
      raise ValueError(f"pixel_values must be NHWC (batch, height, width, 3); got shape "
                       f"{tuple(pixel_values.shape)}")
    x = jax.nn.relu6(self.stem_bn(self.stem_conv(pixel_values.astype(self.dtype))))
    if block_offsets is not None and len(block_offsets) != len(self.blocks):
      raise ValueError(f"block_offsets has {len(block_offsets)} arrays for {len(self.blocks)} "
                       "blocks")
    ends = set(self.config.stage_ends)
    hidden, blocks = [], []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if block_offsets is not None:
        x = x + block_offsets[i]
        blocks.append(x)
      if i in ends:
        hidden.append(x)
    x = jax.nn.relu6(self.head_bn(self.head_conv(x)))
    hidden.append(x)
    # Dropout before the classifier is training-only.
    logits = self.fc(jnp.mean(x, axis=(1, 2)))
    return EfficientNetOutput(logits=logits, hidden_states=tuple(hidden),
                              block_outputs=tuple(blocks))


def select_features(output: EfficientNetOutput, layer: int = -1,
                    pooling: str = "mean") -> jax.Array:
  """Picks one image representation out of an ``EfficientNetOutput``; jittable (``layer`` and
  ``pooling`` static).

  Args:
    output: What ``EfficientNetLite.__call__`` returned.
    layer: Index into ``output.hidden_states``: ``-1`` the final pre-pool feature map, ``0`` ..
      ``6`` (or ``-8`` .. ``-2``) the stage outputs. Must stay at its default for "logits".
    pooling: ``"mean"``: the spatial mean (batch, channels), for ``layer=-1`` exactly what the
      classifier reads; ``"patch_grid"``: the feature map (batch, rows, columns, channels);
      ``"logits"``: ``output.logits`` (batch, num_classes).

  Raises:
    ValueError: an unknown pooling, or a ``layer`` given with "logits".
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
  if pooling == "logits":
    if layer != -1:
      raise ValueError("pooling='logits' reads the classifier output, which has no layer; leave "
                       "layer at its default")
    return output.logits
  h = output.hidden_states[layer]
  if pooling == "mean":
    return jnp.mean(h, axis=(1, 2))
  return h
