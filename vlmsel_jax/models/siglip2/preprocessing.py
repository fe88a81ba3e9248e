"""SigLIP2 NaFlex image preprocessing, as transformers' ``Siglip2ImageProcessorPil`` does it.

Each image is resized, keeping its aspect ratio, to the largest grid of whole patches that holds
at most ``max_num_patches`` patches (``naflex_image_size``, transformers' binary search), with
PIL; rescaled and normalised; cut into patches flattened in (row, column, channel) order, row-major
over the grid; and padded with zero patches to ``max_num_patches``, with a mask that marks the
real ones. The outputs are ``Siglip2Vit.naflex``'s inputs. NumPy and PIL only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

_HALF = (0.5, 0.5, 0.5)


def naflex_image_size(height: int, width: int, patch_size: int, max_num_patches: int,
                      eps: float = 1e-5) -> tuple[int, int]:
  """(height, width) in pixels of an image resized for NaFlex: whole patches, at least one a
  side, at most ``max_num_patches`` in all, the aspect ratio kept as far as that allows.

  transformers' ``get_image_size_for_max_num_patches``: a bisection on the scale factor, with the
  same float steps, so that it lands on the same size.
  """

  def scaled(scale: float, size: int) -> int:
    return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

  low, high = eps / 10, 100.0
  while high - low >= eps:
    scale = (low + high) / 2
    patches = (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size)
    if patches <= max_num_patches:
      low = scale
    else:
      high = scale
  return scaled(low, height), scaled(low, width)


@dataclasses.dataclass(frozen=True)
class NaflexInputs:
  """One image as NaFlex input.

  Attributes:
    pixel_values: (max_num_patches, patch * patch * 3) float32 flattened patches, zero padding.
    pixel_attention_mask: (max_num_patches,) int32, 1 at patches, 0 at padding.
    spatial_shape: (2,) int32 (rows, columns) of the image's patch grid.
  """

  pixel_values: np.ndarray
  pixel_attention_mask: np.ndarray
  spatial_shape: np.ndarray


@dataclasses.dataclass(frozen=True)
class NaflexPreprocessing:
  """transformers' ``Siglip2ImageProcessorPil``, with its defaults.

  Attributes:
    patch_size: Patch side in pixels.
    max_num_patches: Patch budget of an image, also the padded sequence length.
    resample: PIL resampling filter (2: bilinear).
    rescale_factor: Applied to the uint8 pixels before normalising.
    mean: Per-channel mean subtracted after rescaling.
    std: Per-channel standard deviation divided by.
  """

  patch_size: int = 16
  max_num_patches: int = 256
  resample: int = int(Image.Resampling.BILINEAR)
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = _HALF
  std: tuple[float, ...] = _HALF

  def __post_init__(self):
    if self.patch_size < 1 or self.max_num_patches < 1:
      raise ValueError(f"patch_size ({self.patch_size}) and max_num_patches "
                       f"({self.max_num_patches}) must be positive")

  @classmethod
  def from_hf(cls, processor: Mapping[str, Any]) -> NaflexPreprocessing:
    """Reads a ``preprocessor_config.json`` dict; fields it leaves out keep the defaults.

    Raises:
      ValueError: ``do_resize``, ``do_rescale`` or ``do_normalize`` false, which this pipeline
        does not reproduce.
    """
    for flag in ("do_resize", "do_rescale", "do_normalize"):
      if processor.get(flag) is False:
        raise ValueError(f"{flag}=false is not supported")
    default = cls()
    return cls(patch_size=int(processor.get("patch_size", default.patch_size)),
               max_num_patches=int(processor.get("max_num_patches", default.max_num_patches)),
               resample=int(processor.get("resample", default.resample)),
               rescale_factor=float(processor.get("rescale_factor", default.rescale_factor)),
               mean=tuple(float(v) for v in processor.get("image_mean", default.mean)),
               std=tuple(float(v) for v in processor.get("image_std", default.std)))

  @property
  def square_size(self) -> int:
    """The side in pixels NaFlex gives a square image: the square grid within the budget."""
    return math.isqrt(self.max_num_patches) * self.patch_size

  def resized(self, image: Image.Image) -> np.ndarray:
    """A PIL image → (height, width, 3) float32 at its NaFlex size, normalised."""
    image = image.convert("RGB")
    height, width = naflex_image_size(image.height, image.width, self.patch_size,
                                      self.max_num_patches)
    image = image.resize((width, height), resample=self.resample)
    # As transformers: rescaled in float64, then normalised in float32.
    x = (np.asarray(image).astype(np.float64) * self.rescale_factor).astype(np.float32)
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def __call__(self, image: Image.Image) -> NaflexInputs:
    """A PIL image → its padded patch sequence, mask and grid."""
    x = self.resized(image)
    p = self.patch_size
    rows, cols = x.shape[0] // p, x.shape[1] // p
    patches = x.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    pixel_values = np.zeros((self.max_num_patches, patches.shape[1]), np.float32)
    pixel_values[:rows * cols] = patches
    mask = np.zeros(self.max_num_patches, np.int32)
    mask[:rows * cols] = 1
    return NaflexInputs(pixel_values, mask, np.asarray([rows, cols], np.int32))

  def batch(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """PIL images → ``Siglip2Vit.naflex``'s keyword arguments, stacked."""
    items = [self(image) for image in images]
    return {"pixel_values": np.stack([i.pixel_values for i in items]),
            "spatial_shapes": np.stack([i.spatial_shape for i in items]),
            "pixel_attention_mask": np.stack([i.pixel_attention_mask for i in items])}
