"""How an image becomes a vision model's input, in NumPy, before any model runs.

``Preprocessing`` does what transformers' (PIL-backend) image processors do: resize, center crop,
rescale, normalize; ``default_preprocessing`` gives each ViT variant's defaults and
``preprocessing_from_hf`` reads a ``preprocessor_config.json`` on top of them.
``CropFractionPreprocessing`` is TensorFlow's EfficientNet(-Lite) eval recipe (a centred crop of a
fraction of the short side, an antialiased bicubic resize), which the convolutional towers take at
any size. Both map a PIL image to an (h, w, 3) float32 array and describe themselves with
``image_size`` and ``to_dict()`` (part of a feature bank's cache key).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import numpy as np
from PIL import Image

from vlmsel_jax.zoo.specs import ZooError

# transformers' image-processor constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
BILINEAR = int(Image.Resampling.BILINEAR)
BICUBIC = int(Image.Resampling.BICUBIC)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How an image becomes model input, as transformers' (PIL-backend) image processors do it.

  Resize (to ``resize_to`` (height, width), or the shortest edge to ``shortest_edge`` keeping the
  aspect ratio, ``int()`` of the long edge), center crop to ``crop_size``, multiply by
  ``rescale_factor``, then ``(x - mean) / std`` per channel. ``image_size`` is the output
  (height, width); every image of a batch has it.
  """

  resize_to: tuple[int, int] | None = None
  shortest_edge: int | None = None
  crop_size: tuple[int, int] | None = None
  resample: int = BICUBIC
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = HALF
  std: tuple[float, ...] = HALF

  def __post_init__(self):
    if (self.resize_to is None) == (self.shortest_edge is None):
      raise ValueError("give exactly one of resize_to and shortest_edge")
    if self.shortest_edge is not None and self.crop_size is None:
      raise ValueError("a shortest-edge resize needs a crop_size: images of one batch must "
                       "share a size")

  @property
  def image_size(self) -> tuple[int, int]:
    return self.crop_size or self.resize_to

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def __call__(self, image: Image.Image) -> np.ndarray:
    """A PIL image → (height, width, 3) float32, normalized."""
    image = image.convert("RGB")
    if self.resize_to is not None:
      height, width = self.resize_to
    else:
      # transformers' get_resize_output_image_size(default_to_square=False).
      w, h = image.size
      short, long = (w, h) if w <= h else (h, w)
      new_long = int(self.shortest_edge * long / short)
      height, width = ((new_long, self.shortest_edge) if w <= h
                       else (self.shortest_edge, new_long))
    if (height, width) != (image.height, image.width):
      image = image.resize((width, height), resample=self.resample)
    x = np.asarray(image)
    if self.crop_size is not None:
      x = _center_crop(x, self.crop_size)
    # transformers rescales in float64, then normalizes in float32.
    x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return (x - mean) / std


def _center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """transformers' center_crop of an (h, w, c) array, zero-padding when the crop is larger."""
  crop_h, crop_w = size
  h, w = x.shape[:2]
  top, left = (h - crop_h) // 2, (w - crop_w) // 2
  if top >= 0 and left >= 0:
    return x[top:top + crop_h, left:left + crop_w]
  new_h, new_w = max(crop_h, h), max(crop_w, w)
  pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
  padded = np.zeros((new_h, new_w) + x.shape[2:], x.dtype)
  padded[pad_top:pad_top + h, pad_left:pad_left + w] = x
  top, left = top + pad_top, left + pad_left
  return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def _hw(value: Any) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  if isinstance(value, Mapping):
    return (int(value["height"]), int(value["width"]))
  height, width = value
  return (int(height), int(width))


def _keys_cubic(x: np.ndarray) -> np.ndarray:
  """The Keys cubic convolution kernel (a = -0.5) of ``jax.image.resize``'s "bicubic"."""
  out = ((1.5 * x - 2.5) * x) * x + 1.0
  out = np.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, out)
  return np.where(x >= 2.0, 0.0, out)


@functools.lru_cache(maxsize=512)
def _cubic_resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_in, n_out) float32 weights of an antialiased bicubic resize along one axis.

  The matrix ``jax.image.resize(..., "bicubic", antialias=True)`` builds (``scale_and_translate``):
  Keys-cubic weights around each output pixel's centre, the kernel widened by the downscale
  factor, each column normalised to sum to one; in float32, step by step as jax computes them
  (the two agree to a few float32 ulps).
  """
  f32 = np.float32
  # Like jax: 1 / scale in Python floats, then float32.
  inv_scale = f32(1.0 / (n_out / n_in))
  kernel_scale = max(inv_scale, f32(1.0))
  # Each output pixel's centre in input coordinates, rounded to float32 once: what XLA's fused
  # multiply-add gives jax (a rounded product would move the samples by up to ~1e-5 px).
  sample = ((np.arange(n_out) + 0.5) * np.float64(inv_scale) - 0.5).astype(f32)
  x = np.abs(sample[None, :] - np.arange(n_in, dtype=f32)[:, None]) / kernel_scale
  weights = _keys_cubic(x).astype(f32)
  total = weights.sum(axis=0, keepdims=True, dtype=f32)
  weights = np.where(np.abs(total) > f32(1000 * np.finfo(f32).eps),
                     weights / np.where(total != 0, total, f32(1.0)), f32(0.0))
  inside = (sample >= -0.5) & (sample <= n_in - 0.5)
  weights = np.where(inside[None, :], weights, f32(0.0)).astype(f32)
  weights.setflags(write=False)  # Shared through the cache.
  return weights


@dataclasses.dataclass(frozen=True)
class CropFractionPreprocessing:
  """TensorFlow's EfficientNet(-Lite) eval preprocessing, on float pixels.

  A centred square crop of side ``int(crop_fraction * shorter side)`` (the odd pixel of a margin
  goes to the bottom / right, as TensorFlow's offsets put it), scaled to [0, 1], resized to
  ``size`` x ``size`` with an antialiased bicubic (Keys, a = -0.5) filter, then
  ``(x - mean) / std`` per channel. This is ``models.efficientnet.preprocess`` (which resizes with
  ``jax.image.resize``) to float32 rounding, in NumPy: a jax resize compiles anew for every crop
  size, and a real image folder has many.
  """

  size: int
  crop_fraction: float
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    if self.size < 1 or not 0 < self.crop_fraction <= 1:
      raise ValueError(f"size ({self.size}) must be positive and crop_fraction "
                       f"({self.crop_fraction}) in (0, 1]")

  @property
  def image_size(self) -> tuple[int, int]:
    return (self.size, self.size)

  def to_dict(self) -> dict[str, Any]:
    return {"recipe": "center_crop_fraction_then_antialiased_bicubic",
            **dataclasses.asdict(self)}

  def __call__(self, image: Image.Image) -> np.ndarray:
    """A PIL image → (size, size, 3) float32, normalized."""
    x = np.asarray(image.convert("RGB"))
    h, w = x.shape[:2]
    crop = max(1, int(self.crop_fraction * min(h, w)))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    x = x[top:top + crop, left:left + crop].astype(np.float32) / np.float32(255.0)
    if crop != self.size:
      # Rows, then columns: two BLAS matrix products, no per-size compilation.
      weights = _cubic_resize_weights(crop, self.size)
      x = (weights.T @ x.reshape(crop, -1)).reshape(self.size, crop, 3)
      x = (x.transpose(0, 2, 1) @ weights).transpose(0, 2, 1)
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


ImagePreprocessing = Preprocessing | CropFractionPreprocessing


def default_preprocessing(variant: str, image_size: tuple[int, int]) -> Preprocessing:
  """The preprocessing transformers' image processor of each ViT ``variant`` uses by default.

  CLIP: shortest edge to the model size (bicubic), center crop, CLIP mean/std. SigLIP: resize to
  the model size (bicubic), mean = std = 0.5. DINOv2 (BitImageProcessor): shortest edge to 256/224
  of the model size (bicubic), center crop, ImageNet mean/std. ViT: resize (bilinear), 0.5/0.5.
  """
  h, w = image_size
  if variant == "clip":
    return Preprocessing(shortest_edge=min(h, w), crop_size=(h, w), resample=BICUBIC,
                         mean=CLIP_MEAN, std=CLIP_STD)
  if variant == "siglip":
    return Preprocessing(resize_to=(h, w), resample=BICUBIC, mean=HALF, std=HALF)
  if variant == "dinov2":
    return Preprocessing(shortest_edge=round(min(h, w) * 256 / 224), crop_size=(h, w),
                         resample=BICUBIC, mean=IMAGENET_MEAN, std=IMAGENET_STD)
  if variant == "vit":
    return Preprocessing(resize_to=(h, w), resample=BILINEAR, mean=HALF, std=HALF)
  raise ValueError(f"no default preprocessing for variant {variant!r}")


def preprocessing_from_hf(processor: Mapping[str, Any], default: Preprocessing,
                          source: str = "preprocessor_config.json") -> Preprocessing:
  """Reads a transformers ``preprocessor_config.json``; fields it leaves out keep ``default``.

  Raises:
    ZooError: a field this pipeline cannot reproduce (no resize, no normalization, a size form
      other than height/width or shortest_edge).
  """
  p = dict(processor)
  for flag in ("do_resize", "do_rescale", "do_normalize"):
    if p.get(flag) is False:
      raise ZooError(f"{source}: {flag}=false is not supported")
  resize_to, shortest = default.resize_to, default.shortest_edge
  size = p.get("size")
  if isinstance(size, Mapping) and "shortest_edge" in size:
    resize_to, shortest = None, int(size["shortest_edge"])
  elif isinstance(size, Mapping) and {"height", "width"} <= set(size):
    resize_to, shortest = _hw(size), None
  elif isinstance(size, int):
    # Legacy int sizes mean what the processor's default size form means.
    if default.shortest_edge is not None:
      resize_to, shortest = None, size
    else:
      resize_to, shortest = (size, size), None
  elif size is not None:
    raise ZooError(f"{source}: size {size!r} is not supported (use height/width or "
                   "shortest_edge)")
  do_crop = p.get("do_center_crop", default.crop_size is not None)
  crop = None
  if do_crop:
    crop = p.get("crop_size") or default.crop_size or resize_to
    if crop is None:
      raise ZooError(f"{source}: do_center_crop without a crop_size")
    crop = _hw(crop)
  try:
    return Preprocessing(
        resize_to=resize_to, shortest_edge=shortest, crop_size=crop,
        resample=int(p.get("resample", default.resample)),
        rescale_factor=float(p.get("rescale_factor", default.rescale_factor)),
        mean=tuple(float(v) for v in p.get("image_mean", default.mean)),
        std=tuple(float(v) for v in p.get("image_std", default.std)))
  except ValueError as e:
    raise ZooError(f"{source}: {e}") from None


# timm's interpolation names -> PIL filters (what torchvision's Resize uses on a PIL image).
TIMM_INTERPOLATIONS = {"nearest": int(Image.Resampling.NEAREST), "bilinear": BILINEAR,
                       "bicubic": BICUBIC, "lanczos": int(Image.Resampling.LANCZOS)}
TIMM_DEFAULT_CROP_PCT = 0.875


@dataclasses.dataclass(frozen=True)
class TimmPreprocessing:
  """timm's eval transform (``transforms_imagenet_eval``, crop_mode "center") of a square model.

  The shorter side is resized to ``floor(size / crop_pct)`` with ``interpolation`` (the longer
  to ``int()`` of the same scale), a ``size`` x ``size`` centre crop is taken with torchvision's
  ``round()`` offsets, the pixels are scaled to [0, 1] in float32 and normalized per channel.
  """

  size: int
  crop_pct: float
  interpolation: str
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    if self.size < 1 or not 0 < self.crop_pct <= 1:
      raise ValueError(f"size ({self.size}) must be positive and crop_pct ({self.crop_pct}) in "
                       "(0, 1]")
    if self.interpolation not in TIMM_INTERPOLATIONS:
      raise ValueError(f"interpolation {self.interpolation!r} is not one of "
                       f"{', '.join(TIMM_INTERPOLATIONS)}")

  @property
  def image_size(self) -> tuple[int, int]:
    return (self.size, self.size)

  @property
  def scale_size(self) -> int:
    """The shorter side after the resize."""
    return math.floor(self.size / self.crop_pct)

  def to_dict(self) -> dict[str, Any]:
    return {"recipe": "timm_eval_center_crop", **dataclasses.asdict(self)}

  def crop_box(self, height: int, width: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop`` in a ``height`` x ``width`` image."""
    return (int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0)))

  def __call__(self, image: Image.Image) -> np.ndarray:
    """A PIL image -> (size, size, 3) float32, normalized."""
    image = image.convert("RGB")
    w, h = image.size
    short = self.scale_size
    if min(w, h) != short:
      # torchvision's Resize(int): the shorter side to `short`, the longer one int() of the scale.
      if w <= h:
        w, h = short, int(short * h / w)
      else:
        w, h = int(short * w / h), short
      image = image.resize((w, h), resample=TIMM_INTERPOLATIONS[self.interpolation])
    top, left = self.crop_box(h, w)
    x = np.asarray(image)[top:top + self.size, left:left + self.size]
    # torchvision's ToTensor: float32 division by 255; Normalize in float32.
    x = x.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def preprocessing_from_timm(pretrained_cfg: Mapping[str, Any],
                            source: str = "config.json") -> TimmPreprocessing:
  """Reads the ``pretrained_cfg`` of a timm ``config.json``: input_size, crop_pct, interpolation,
  crop_mode, mean, std; absent ones take ``timm.data.resolve_data_config``'s defaults (crop_pct
  0.875, bicubic, ImageNet mean / std).

  Raises:
    ZooError: a non-square input, a crop_mode other than "center", or a field this pipeline
      cannot reproduce.
  """
  cfg = dict(pretrained_cfg)
  try:
    _, height, width = cfg["input_size"]
    if height != width:
      raise ValueError(f"input_size {cfg['input_size']} is not square")
    if cfg.get("crop_mode", "center") not in ("center", None):
      raise ValueError(f"crop_mode {cfg['crop_mode']!r} is not supported (only 'center')")
    return TimmPreprocessing(size=int(height),
                             crop_pct=float(cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT),
                             interpolation=str(cfg.get("interpolation") or "bicubic"),
                             mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
                             std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)))
  except (KeyError, TypeError, ValueError) as e:
    raise ZooError(f"{source}: pretrained_cfg cannot be reproduced ({e})") from None


# transformers' ConvNextImageProcessor: below this shortest_edge it resizes the short side to
# shortest_edge / crop_pct and centre-crops; from it on it warps the image to a square.
CONVNEXT_CROP_BELOW = 384
CONVNEXT_CROP_PCT = 224 / 256


def preprocessing_from_convnext(processor: Mapping[str, Any] | None, image_size: int,
                                source: str = "preprocessor_config.json") -> Preprocessing:
  """transformers' ``ConvNextImageProcessor`` (PIL backend) from its ``preprocessor_config.json``.

  ``processor`` None (no file): the hub checkpoints' settings at ``image_size``: crop_pct 0.875,
  bicubic, ImageNet mean / std. A file's missing fields take the processor class's defaults.

  Raises:
    ZooError: a setting this pipeline cannot reproduce (no resize / rescale / normalization, an
      extra centre crop, a size without shortest_edge).
  """
  p = dict(processor) if processor is not None else {}
  for flag in ("do_resize", "do_rescale", "do_normalize"):
    if p.get(flag) is False:
      raise ZooError(f"{source}: {flag}=false is not supported")
  if p.get("do_center_crop"):
    raise ZooError(f"{source}: do_center_crop is not supported for a ConvNeXt processor (its "
                   "resize crops)")
  size = p.get("size", image_size)
  if isinstance(size, Mapping):
    if "shortest_edge" not in size:
      raise ZooError(f"{source}: size {dict(size)} has no shortest_edge, which "
                     "ConvNextImageProcessor needs")
    size = size["shortest_edge"]
  size = int(size)
  crop_pct = float(p.get("crop_pct") or CONVNEXT_CROP_PCT)
  default_mean, default_std = (HALF, HALF) if processor is not None else (IMAGENET_MEAN,
                                                                           IMAGENET_STD)
  common = dict(resample=int(p.get("resample", BICUBIC)),
                rescale_factor=float(p.get("rescale_factor", 1 / 255)),
                mean=tuple(float(v) for v in p.get("image_mean", default_mean)),
                std=tuple(float(v) for v in p.get("image_std", default_std)))
  if size < CONVNEXT_CROP_BELOW:
    return Preprocessing(shortest_edge=int(size / crop_pct), crop_size=(size, size), **common)
  return Preprocessing(resize_to=(size, size), **common)


def preprocessing_from_open_clip(preprocess_cfg: Mapping[str, Any], image_size: int,
                                 source: str = "open_clip_config.json") -> ImagePreprocessing:
  """OpenCLIP's eval transform (``image_transform_v2``) for a square ``image_size`` model.

  OpenCLIP sizes the transform by the vision tower's ``image_size`` and reads the rest from
  ``preprocess_cfg`` (missing fields: its ``PreprocessCfg`` defaults, OpenAI's mean / std,
  bicubic, resize_mode "shortest"). "shortest" is torchvision's ``Resize(size)`` then
  ``CenterCrop(size)``: ``TimmPreprocessing`` at crop_pct 1; "squash" is ``Resize((size,
  size))``.

  Raises:
    ZooError: resize_mode "longest" (a padded letterbox) or an unknown setting.
  """
  cfg = dict(preprocess_cfg)
  if cfg.get("mode", "RGB") != "RGB":
    raise ZooError(f"{source}: preprocess_cfg mode {cfg['mode']!r} is not supported (RGB)")
  stats = []
  for key, default in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
    value = cfg.get(key) or default
    stats.append(tuple(float(v) for v in (value if isinstance(value, (list, tuple))
                                          else (value,) * 3)))
  interpolation = cfg.get("interpolation") or "bicubic"
  if interpolation not in ("bicubic", "bilinear", "random"):
    raise ZooError(f"{source}: interpolation {interpolation!r} is not one of bicubic, bilinear, "
                   "random")
  # OpenCLIP evaluates "random" with bicubic.
  interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"
  mode = cfg.get("resize_mode") or "shortest"
  if mode == "shortest":
    return TimmPreprocessing(size=image_size, crop_pct=1.0, interpolation=interpolation,
                             mean=stats[0], std=stats[1])
  if mode == "squash":
    return Preprocessing(resize_to=(image_size, image_size),
                         resample=TIMM_INTERPOLATIONS[interpolation], mean=stats[0],
                         std=stats[1])
  raise ZooError(f"{source}: resize_mode {mode!r} is not supported (shortest or squash)")


# The zoo's input for a Qwen2.5-VL tower: this many merged tokens a side, 16 x 16 = 256 tokens
# for the language model: 448 px for patch 14 and merge 2 (every released checkpoint), which the
# processor's default pixel bounds admit.
QWEN2_VL_MERGED_SIDE = 16


def preprocessing_from_qwen2_vl(processor: Mapping[str, Any] | None, patch_size: int,
                                merge_size: int, side: int | None = None,
                                source: str = "preprocessor_config.json") -> Preprocessing:
  """transformers' ``Qwen2VLImageProcessor`` (Qwen2.5-VL's) at one fixed square size.

  The processor resizes each image (bicubic) to its own size near its aspect ratio, sides
  multiples of ``patch_size * merge_size``, its pixel count within ``min_pixels`` ..
  ``max_pixels``; a batch of the zoo has one size, so every image is resized to ``side`` x
  ``side`` (None: ``QWEN2_VL_MERGED_SIDE`` merged tokens, 448 px for Qwen2.5-VL; ``@res=`` picks
  another multiple), and the pixel bounds have nothing to bound. Then it rescales and normalizes
  as the file says (OpenAI CLIP's mean / std by default).

  Raises:
    ZooError: a step switched off, a side that is no multiple of ``patch_size * merge_size``, or
      a processor whose patch or merge size is not the model's.
  """
  p = dict(processor) if processor is not None else {}
  for flag in ("do_resize", "do_rescale", "do_normalize"):
    if p.get(flag) is False:
      raise ZooError(f"{source}: {flag}=false is not supported")
  for field, model_value in (("patch_size", patch_size), ("merge_size", merge_size)):
    if int(p.get(field, model_value)) != model_value:
      raise ZooError(f"{source}: {field} {p[field]} but the model's is {model_value}")
  if side is None:
    side = QWEN2_VL_MERGED_SIDE * patch_size * merge_size
  if side % (patch_size * merge_size):
    raise ZooError(f"{source}: side {side} is not a multiple of {patch_size * merge_size}")
  return Preprocessing(resize_to=(side, side), resample=int(p.get("resample", BICUBIC)),
                       rescale_factor=float(p.get("rescale_factor", 1 / 255)),
                       mean=tuple(float(v) for v in p.get("image_mean", CLIP_MEAN)),
                       std=tuple(float(v) for v in p.get("image_std", CLIP_STD)))


def preprocessing_at_side(preprocessing: Any, side: int, source: str) -> Any:
  """The same recipe making ``side`` x ``side`` inputs (``@res=`` of a tower of any input size).

  A shortest-edge resize and square crop keep their ratio (``int(side * shortest_edge / crop)``,
  what ConvNextImageProcessor computes for a shortest_edge of ``side``); a square warp becomes
  ``side`` x ``side``; a recipe with a ``size`` (crop fraction, timm) takes ``side``.

  Raises:
    ZooError: a recipe without a square output.
  """
  if isinstance(preprocessing, Preprocessing):
    if preprocessing.crop_size is None and len(set(preprocessing.resize_to)) == 1:
      return dataclasses.replace(preprocessing, resize_to=(side, side))
    crop = preprocessing.crop_size
    if preprocessing.shortest_edge is not None and crop is not None and len(set(crop)) == 1:
      return dataclasses.replace(preprocessing,
                                 shortest_edge=int(side * preprocessing.shortest_edge / crop[0]),
                                 crop_size=(side, side))
  elif dataclasses.is_dataclass(preprocessing) and "size" in {
      f.name for f in dataclasses.fields(preprocessing)}:
    return dataclasses.replace(preprocessing, size=side)
  raise ZooError(f"{source}: res={side} needs a square preprocessing; this one makes "
                 f"{preprocessing.image_size} images")
