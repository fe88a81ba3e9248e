"""ConvNeXt image encoders in Flax NNX: transformers' ``ConvNextModel`` and OpenCLIP's ConvNeXt
CLIP towers (a timm ``convnext_*`` trunk and a projection head), one module for both.

The network is a patchify stem (a ``patch_size`` x ``patch_size`` convolution of the same
stride, then LayerNorm) and stages of ConvNeXt blocks, each stage after the first entered through
a LayerNorm and a 2 x 2 stride-2 convolution. A block is a depthwise k x k convolution, LayerNorm,
Linear (4x wider), an activation (GELU), Linear, a per-channel layer scale and a residual
connection. The pooled output is the LayerNorm of the last stage's spatial mean (transformers'
``pooler_output``, timm's trunk output); an OpenCLIP tower maps it through its head (a bias-free
Linear, or an MLP) to the CLIP image embedding that ``encode_image`` returns.

Images and feature maps are NHWC, the layout ``nnx.Conv`` works in; a torch ``pixel_values``
batch (NCHW) becomes ours with ``x.transpose(0, 2, 3, 1)``. The two checkpoint formats name the
same tensors differently (``params.key_table``); ``ConvNextConfig.weights_format`` says which.
Every convolution but the depthwise ones is unpadded, so any input of at least
``patch_size * 2 ** (stages - 1)`` pixels a side runs (a CNN takes any size).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vlmsel_jax.models import hf_config
from vlmsel_jax.models.efficientnet.modeling import DepthwiseConv

SUPPORTED_MODEL_TYPES = ("convnext",)
# transformers' classes whose checkpoints load (the classifier's weights are skipped), and the
# name ``ConvNextConfig.to_dict`` gives an OpenCLIP tower.
OPEN_CLIP_ARCHITECTURE = "OpenCLIPConvNeXt"
SUPPORTED_ARCHITECTURES = ("ConvNextModel", "ConvNextForImageClassification",
                           OPEN_CLIP_ARCHITECTURE)
WEIGHTS_FORMATS = ("transformers", "open_clip")
POOLINGS = ("mean", "patch_grid", "pooler", "embedding")
PROJECTIONS = ("linear", "mlp")


def _erf_gelu(x: jax.Array) -> jax.Array:
  # torch's exact GELU, written as torch writes it: faster on XLA:CPU than jax.nn.gelu's erfc
  # form (benchmarks/README.md).
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def _tanh_gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


# Activation names of transformers' ACT2FN and timm's get_act_layer -> the function.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _erf_gelu,
    "gelu_tanh": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_new": _tanh_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}

# transformers' ConvNextConfig defaults: a hub config.json leaves out fields that equal them.
_HF_DEFAULTS: dict[str, Any] = dict(
    num_channels=3, patch_size=4, num_stages=4, hidden_sizes=(96, 192, 384, 768),
    depths=(3, 3, 9, 3), hidden_act="gelu", layer_norm_eps=1e-12, layer_scale_init_value=1e-6,
    image_size=224)
# transformers hard-codes the epsilon of every LayerNorm but the pooled output's.
_HF_BLOCK_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class TimmConvNext:
  """The architecture timm registers under one ``convnext_*`` name (OpenCLIP names only that).

  Attributes:
    depths: Blocks per stage.
    dims: Channels per stage.
    norm_eps: Epsilon of every LayerNorm.
    act: Activation of the block MLPs.
    kernel_sizes: Depthwise kernel size per stage.
  """

  depths: tuple[int, ...]
  dims: tuple[int, ...]
  norm_eps: float = 1e-6
  act: str = "gelu"
  kernel_sizes: tuple[int, ...] = (7, 7, 7, 7)


# timm.models.convnext: the patch-stem, Linear-MLP (conv_mlp=False) models. OpenCLIP's ConvNeXt
# configs use tiny .. xxlarge; test_convnext* are timm's own tiny test models.
TIMM_CONVNEXTS: dict[str, TimmConvNext] = {
    "convnext_tiny": TimmConvNext((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": TimmConvNext((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": TimmConvNext((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": TimmConvNext((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": TimmConvNext((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "convnext_xxlarge": TimmConvNext((3, 4, 30, 3), (384, 768, 1536, 3072), norm_eps=1e-5),
    "test_convnext": TimmConvNext((1, 2, 4, 2), (24, 32, 48, 64), norm_eps=1e-5,
                                  act="gelu_tanh"),
    "test_convnext2": TimmConvNext((1, 1, 1, 1), (32, 64, 96, 128), norm_eps=1e-5,
                                   act="gelu_tanh"),
    "test_convnext3": TimmConvNext((1, 1, 1, 1), (32, 64, 96, 128), norm_eps=1e-5, act="silu",
                                   kernel_sizes=(7, 5, 5, 3)),
}


def _square(value: Any, name: str) -> int:
  """An int, or the side of an (h, w) pair with h == w."""
  if isinstance(value, int):
    return value
  if len(set(value)) != 1:
    raise ValueError(f"{name} {list(value)} is not square")
  return int(value[0])


@dataclasses.dataclass(frozen=True)
class ConvNextConfig:
  """Hyper-parameters of a ConvNeXt encoder.

  Attributes:
    depths: Blocks per stage.
    hidden_sizes: Channels per stage.
    kernel_sizes: Depthwise kernel size per stage.
    patch_size: Side and stride of the stem convolution.
    num_channels: Input channels.
    norm_eps: Epsilon of the stem, block and downsampling LayerNorms.
    final_norm_eps: Epsilon of the LayerNorm on the pooled output.
    hidden_act: Activation of the block MLPs (a key of ``ACTIVATIONS``).
    mlp_ratio: Block MLP width over the stage width.
    layer_scale: Whether blocks scale their output per channel (``gamma``).
    image_size: Native input side in pixels (preprocessing; the network takes any size).
    weights_format: "transformers" or "open_clip": which key table reads the checkpoint.
    embed_dim: Width of the CLIP image embedding (OpenCLIP towers), else None.
    projection: The OpenCLIP head, "linear" or "mlp" (None without a head).
    projection_bias: Whether the head's last Linear has a bias (OpenCLIP's ``timm_proj_bias``).
    model_type: The config dict's model_type.
  """

  depths: tuple[int, ...] = (3, 3, 9, 3)
  hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
  kernel_sizes: tuple[int, ...] = (7, 7, 7, 7)
  patch_size: int = 4
  num_channels: int = 3
  norm_eps: float = 1e-6
  final_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  mlp_ratio: int = 4
  layer_scale: bool = True
  image_size: int = 224
  weights_format: str = "transformers"
  embed_dim: int | None = None
  projection: str | None = None
  projection_bias: bool = False
  model_type: str = "convnext"

  def __post_init__(self):
    for name in ("depths", "hidden_sizes", "kernel_sizes"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if not self.depths or len(self.hidden_sizes) != len(self.depths) or len(
        self.kernel_sizes) != len(self.depths):
      raise ValueError(f"depths {self.depths}, hidden_sizes {self.hidden_sizes} and kernel_sizes "
                       f"{self.kernel_sizes} must be non-empty and of one length")
    if min(self.depths) < 1 or min(self.hidden_sizes) < 1 or self.patch_size < 1:
      raise ValueError("depths, hidden_sizes and patch_size must be positive")
    if any(k % 2 == 0 for k in self.kernel_sizes):
      raise ValueError(f"kernel_sizes {self.kernel_sizes} must be odd (symmetric padding)")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
    if self.weights_format not in WEIGHTS_FORMATS:
      raise ValueError(f"weights_format {self.weights_format!r} is not one of "
                       f"{', '.join(WEIGHTS_FORMATS)}")
    if (self.projection is None) != (self.embed_dim is None):
      raise ValueError("give both or neither of projection and embed_dim")
    if self.projection is not None and self.projection not in PROJECTIONS:
      raise ValueError(f"projection {self.projection!r} is not one of {', '.join(PROJECTIONS)}")

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def min_input_size(self) -> int:
    """The smallest input side every stage still has a pixel of."""
    return self.patch_size * 2 ** (self.num_stages - 1)

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str) -> ConvNextConfig:
    """Reads a transformers ``ConvNextConfig`` dict (or ``config.json``), or ``to_dict``'s output.

    Raises:
      ValueError: another model_type, or a config this module does not implement.
    """
    c = hf_config.read_config(config)
    if c.get("model_type") not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {c.get('model_type')!r} is not a ConvNeXt; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if "weights_format" in c:
      # Our own dict (to_dict): every field by name.
      fields = {f.name for f in dataclasses.fields(cls)}
      unknown = sorted(set(c) - fields - {"architectures"})
      if unknown:
        raise ValueError(f"unknown ConvNeXt config field(s): {', '.join(unknown)}")
      return cls(**{k: v for k, v in c.items() if k in fields})
    c = {**_HF_DEFAULTS, **c}
    depths, sizes = tuple(c["depths"]), tuple(c["hidden_sizes"])
    if len(depths) != c["num_stages"]:
      raise ValueError(f"num_stages {c['num_stages']} but {len(depths)} depths")
    patch = _square(c["patch_size"], "patch_size")
    image_size = _square(c["image_size"], "image_size")
    return cls(depths=depths, hidden_sizes=sizes, kernel_sizes=(7,) * len(depths),
               patch_size=int(patch), num_channels=int(c["num_channels"]),
               norm_eps=_HF_BLOCK_NORM_EPS, final_norm_eps=float(c["layer_norm_eps"]),
               hidden_act=c["hidden_act"], layer_scale=c["layer_scale_init_value"] > 0,
               image_size=int(image_size), weights_format="transformers")

  @classmethod
  def from_open_clip(cls, model_cfg: Mapping[str, Any],
                     source: str = "open_clip_config.json") -> ConvNextConfig:
    """Reads the ``model_cfg`` of an OpenCLIP model whose vision tower is a timm ConvNeXt.

    OpenCLIP's ``TimmModel`` with ``timm_proj`` "linear" or "mlp" keeps the trunk's own head,
    global average pool then LayerNorm, and adds its projection to ``embed_dim`` after it.

    Raises:
      ValueError: one line naming ``source``: the vision tower is no timm ConvNeXt this module
        implements, or its pooling / projection is another.
    """
    vision = model_cfg.get("vision_cfg") or {}
    name = vision.get("timm_model_name")
    if not name:
      raise ValueError(f"{source}: the vision tower is not a timm model (no "
                       "vision_cfg.timm_model_name), so not a ConvNeXt")
    # "convnext_base.clip_laion2b" names pretrained weights of convnext_base; "timm/" a hub copy.
    arch = str(name).removeprefix("timm/").split(".")[0]
    if arch not in TIMM_CONVNEXTS:
      raise ValueError(f"{source}: vision tower {name!r} is not a supported ConvNeXt (supported "
                       f"timm names: {', '.join(TIMM_CONVNEXTS)})")
    pool = vision.get("timm_pool", "avg")
    proj = vision.get("timm_proj", "linear")
    if pool not in ("", "avg") or proj not in PROJECTIONS:
      raise ValueError(f"{source}: timm_pool {pool!r} / timm_proj {proj!r} is not implemented "
                       "(a ConvNeXt tower needs timm_pool '' or 'avg' and timm_proj 'linear' or "
                       "'mlp')")
    timm = TIMM_CONVNEXTS[arch]
    try:
      image_size = _square(vision.get("image_size", 224), "vision_cfg.image_size")
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None
    return cls(depths=timm.depths, hidden_sizes=timm.dims, kernel_sizes=timm.kernel_sizes,
               patch_size=4, num_channels=3, norm_eps=timm.norm_eps, final_norm_eps=timm.norm_eps,
               hidden_act=timm.act, layer_scale=True, image_size=int(image_size),
               weights_format="open_clip", embed_dim=int(model_cfg["embed_dim"]),
               projection=proj, projection_bias=bool(vision.get("timm_proj_bias", False)))

  def to_dict(self) -> dict[str, Any]:
    """The config dict ``from_hf`` reads back (and ``loading.load_model`` takes)."""
    d = dataclasses.asdict(self)
    d["architectures"] = [OPEN_CLIP_ARCHITECTURE if self.weights_format == "open_clip"
                          else "ConvNextModel"]
    return d


def _layer_norm(features: int, eps: float, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # The two-pass variance, as torch computes it: the residual stream's mean can be large.
  return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, dtype=dtype,
                       param_dtype=dtype, rngs=rngs)


class ConvNextBlock(nnx.Module):
  """Depthwise k x k conv (with bias), LayerNorm, Linear, activation, Linear, layer scale, +x."""

  def __init__(self, dim: int, kernel_size: int, config: ConvNextConfig, *, dtype: Any,
               rngs: nnx.Rngs):
    self.dwconv = DepthwiseConv(dim, kernel_size, stride=1, dtype=dtype, rngs=rngs)
    self.dwconv_bias = nnx.Param(jnp.zeros((dim,), dtype))
    self.norm = _layer_norm(dim, config.norm_eps, dtype, rngs)
    self.fc1 = nnx.Linear(dim, config.mlp_ratio * dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(config.mlp_ratio * dim, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.gamma = nnx.Param(jnp.ones((dim,), dtype)) if config.layer_scale else None
    self.act = ACTIVATIONS[config.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.dwconv(x) + self.dwconv_bias[...].astype(x.dtype)
    h = self.fc2(self.act(self.fc1(self.norm(h))))
    if self.gamma is not None:
      h = h * self.gamma[...].astype(h.dtype)
    # Stochastic depth is training-only.
    return x + h


class ConvNextStage(nnx.Module):
  """[LayerNorm, 2 x 2 stride-2 conv] (every stage but the first), then the blocks."""

  def __init__(self, in_dim: int, out_dim: int, depth: int, kernel_size: int, downsample: bool,
               config: ConvNextConfig, *, dtype: Any, rngs: nnx.Rngs):
    if downsample:
      self.downsample_norm = _layer_norm(in_dim, config.norm_eps, dtype, rngs)
      self.downsample_conv = nnx.Conv(in_dim, out_dim, (2, 2), strides=2, padding="VALID",
                                      dtype=dtype, param_dtype=dtype, rngs=rngs)
    else:
      self.downsample_norm = None
      self.downsample_conv = None
    self.blocks = nnx.List([ConvNextBlock(out_dim, kernel_size, config, dtype=dtype, rngs=rngs)
                            for _ in range(depth)])

  def __call__(self, x: jax.Array, block_offsets: Sequence[jax.Array] | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The stage's output map, and every block's output when ``block_offsets`` (one array per
    block, added to its output) is given, else ()."""
    if self.downsample_conv is not None:
      x = self.downsample_conv(self.downsample_norm(x))
    outputs = []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if block_offsets is not None:
        x = x + block_offsets[i]
        outputs.append(x)
    return x, tuple(outputs)


class ProjectionHead(nnx.Module):
  """OpenCLIP's ``TimmModel`` head: a Linear, or Linear (2 x embed_dim, bias), GELU, Linear."""

  def __init__(self, in_dim: int, config: ConvNextConfig, *, dtype: Any, rngs: nnx.Rngs):
    width = config.embed_dim
    if config.projection == "linear":
      self.fc1 = None
      self.proj = nnx.Linear(in_dim, width, use_bias=config.projection_bias, dtype=dtype,
                             param_dtype=dtype, rngs=rngs)
    else:
      self.fc1 = nnx.Linear(in_dim, 2 * width, dtype=dtype, param_dtype=dtype, rngs=rngs)
      self.proj = nnx.Linear(2 * width, width, use_bias=config.projection_bias, dtype=dtype,
                             param_dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.fc1 is not None:
      # timm's Mlp with its default nn.GELU: exact. Dropout is training-only.
      x = _erf_gelu(self.fc1(x))
    return self.proj(x)


@struct.dataclass
class ConvNextOutput:
  """What ``ConvNext.__call__`` returns; a pytree, so it passes through ``jax.jit``.

  Attributes:
    hidden_states: ``num_stages + 1`` NHWC feature maps: the stem's output, then each stage's
      (transformers' ``hidden_states``).
    pooler_output: (batch, channels) LayerNorm of the last map's spatial mean (transformers'
      ``pooler_output``; timm's trunk output).
    image_embeds: (batch, embed_dim) the OpenCLIP head's output, what ``encode_image`` returns
      (unnormalised); None without a head.
  """

  hidden_states: tuple[jax.Array, ...]
  pooler_output: jax.Array
  image_embeds: jax.Array | None = None
  # Every ConvNeXt block's output, stage by stage, block 0 first; filled only when
  # ``block_offsets`` is given (layer conductance attributes through every block).
  block_outputs: tuple[jax.Array, ...] = ()

  @property
  def last_hidden_state(self) -> jax.Array:
    return self.hidden_states[-1]


class ConvNext(nnx.Module):
  """A ConvNeXt encoder (and an OpenCLIP tower's projection head when the config has one)."""

  # The vision-tower protocol (see ``vit.Vit.patch_grid``). The last stage's map is the last
  # representation before the pooling head (mean, LayerNorm, classifier / CLIP projection): no
  # head layer works on the grid, as EfficientNet's 1x1 head conv does, so the default is it.
  # ConvNeXt towers in VLMs (ConvLLaVA, Cambrian's OpenCLIP ConvNeXt) read this map too.
  GRID_DEFAULT_LAYER = -1
  # Convolutions only: ``zoo``'s ``@res=`` may resize its input.
  TAKES_ANY_INPUT_SIZE = True

  def __init__(self, config: ConvNextConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtype = jnp.dtype(dtype)
    dims = c.hidden_sizes
    self.stem_conv = nnx.Conv(c.num_channels, dims[0], (c.patch_size, c.patch_size),
                              strides=c.patch_size, padding="VALID", dtype=dtype,
                              param_dtype=dtype, rngs=rngs)
    self.stem_norm = _layer_norm(dims[0], c.norm_eps, dtype, rngs)
    stages = []
    for i, (depth, kernel) in enumerate(zip(c.depths, c.kernel_sizes)):
      previous = dims[max(i - 1, 0)]
      # Both libraries enter a stage through a downsampling layer unless it keeps width and size:
      # the first stage, which the stem has already strided.
      stages.append(ConvNextStage(previous, dims[i], depth, kernel, downsample=i > 0, config=c,
                                  dtype=dtype, rngs=rngs))
    self.stages = nnx.List(stages)
    self.final_norm = _layer_norm(dims[-1], c.final_norm_eps, dtype, rngs)
    self.head = (ProjectionHead(dims[-1], c, dtype=dtype, rngs=rngs)
                 if c.projection is not None else None)

  def patch_grid(self, pixels: jax.Array, layer: int) -> jax.Array:
    """(batch, rows, cols, channels): the NHWC map ``hidden_states[layer]``."""
    return self(pixels).hidden_states[layer]

  @property
  def num_blocks(self) -> int:
    """ConvNeXt blocks over all stages (what ``block_offsets`` has one array for)."""
    return sum(len(stage.blocks) for stage in self.stages)

  def __call__(self, pixel_values: jax.Array,
               block_offsets: Sequence[jax.Array] | None = None) -> ConvNextOutput:
    """Encodes a batch of preprocessed images.

    Args:
      pixel_values: (batch, height, width, channels) images, NHWC, at least
        ``config.min_input_size`` pixels a side.
      block_offsets: Optional, one array per ConvNeXt block (``num_blocks``, stage by stage),
        each broadcastable to that block's output and added to it; the output then also holds
        every block's output. Zeros change nothing: differentiating at zero gives the gradient
        with respect to each block's output (``selection.conductance``).

    Returns:
      A ``ConvNextOutput``: every stage's map, the pooled output and the OpenCLIP embedding.

    Raises:
      ValueError: the input is not NHWC with the config's channels, or too small for the stages;
        ``block_offsets`` of the wrong length.
    """
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
      raise ValueError(f"pixel_values must be NHWC (batch, height, width, {c.num_channels}); got "
                       f"shape {tuple(pixel_values.shape)}")
    if min(pixel_values.shape[1:3]) < c.min_input_size:
      raise ValueError(f"images of {pixel_values.shape[1]}x{pixel_values.shape[2]} px are too "
                       f"small: this ConvNeXt needs at least {c.min_input_size} px a side")
    if block_offsets is not None and len(block_offsets) != self.num_blocks:
      raise ValueError(f"block_offsets has {len(block_offsets)} arrays for {self.num_blocks} "
                       "blocks")
    x = self.stem_norm(self.stem_conv(pixel_values.astype(self.dtype)))
    hidden, blocks, start = [x], [], 0
    for stage in self.stages:
      offsets = None
      if block_offsets is not None:
        offsets = block_offsets[start:start + len(stage.blocks)]
        start += len(stage.blocks)
      x, outputs = stage(x, offsets)
      hidden.append(x)
      blocks.extend(outputs)
    pooled = self.final_norm(jnp.mean(x, axis=(1, 2)))
    embeds = self.head(pooled) if self.head is not None else None
    return ConvNextOutput(hidden_states=tuple(hidden), pooler_output=pooled,
                          image_embeds=embeds, block_outputs=tuple(blocks))


def select_features(output: ConvNextOutput, layer: int = -1, pooling: str = "mean") -> jax.Array:
  """Picks one image representation out of a ``ConvNextOutput``; jittable (``layer`` and
  ``pooling`` static).

  Args:
    output: What ``ConvNext.__call__`` returned.
    layer: Index into ``output.hidden_states`` (0: the stem, -1: the last stage). Must stay at
      its default for "pooler" and "embedding".
    pooling: ``"mean"``: the layer's spatial mean (batch, channels); ``"patch_grid"``: the map
      (batch, rows, columns, channels); ``"pooler"``: ``output.pooler_output``; ``"embedding"``:
      the OpenCLIP image embedding ``output.image_embeds``.

  Raises:
    ValueError: an unknown pooling, "embedding" without a head, or a layer with "pooler" /
      "embedding".
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
  if pooling in ("pooler", "embedding"):
    if layer != -1:
      raise ValueError(f"pooling={pooling!r} reads the pooled output, which has no layer; leave "
                       "layer at its default")
    if pooling == "pooler":
      return output.pooler_output
    if output.image_embeds is None:
      raise ValueError("pooling='embedding' needs an OpenCLIP tower's projection head; this "
                       "ConvNeXt has none")
    return output.image_embeds
  h = output.hidden_states[layer]
  if pooling == "mean":
    return jnp.mean(h, axis=(1, 2))
  return h

