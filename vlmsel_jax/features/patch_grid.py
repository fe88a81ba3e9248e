"""Patch-feature grids of vision encoders: ``patch_grid(loaded, pixels, layer)`` → (B, h, w, D).

The C score (and a VLM's image tokens) need an encoder's features per image location, at the
encoder's own resolution:

* ViT family (CLIP, SigLIP, DINOv2, ViT): the patch tokens of ``hidden_states[layer]``, CLS and
  register tokens dropped, reshaped row-major to the (rows, columns) patch grid.
* EfficientNet-Lite: the NHWC feature map ``hidden_states[layer]``. Its ``hidden_states`` are the
  seven MBConv stage outputs, then the head's 1280-channel map (1x1 conv, BN, ReLU6) that the
  classifier pools. "Second-to-last layer" (``layer=-2``, the default for both families) is
  therefore the output of the last MBConv stage (320 channels for lite0/1, 352 for lite2) at
  stride 32 (7x7 for lite0 at 224 px): the last representation before the classification head,
  as a ViT's second-to-last block output is the last before its final block. Its native grid is
  coarse; ``layer=-4`` (the fifth stage, the last at stride 16: 14x14 for lite0) is finer and
  is a flag away in ``correspondence_score``.
* ConvNeXt (transformers, OpenCLIP): the NHWC map ``hidden_states[layer]``: the stem's, then
  each stage's. Its default is the last stage (``layer=-1``, stride 32): only pooling and the
  classifier / CLIP projection follow it, no layer on the grid (``ConvNext.GRID_DEFAULT_LAYER``).
* Pixel patches / HOG (``models.handcrafted``): their grids (the patches; HOG's blocks at -1,
  its cell histograms at -2).

``resize_for_grid`` prepares an image for a grid: the whole image resized to the model's input
size (no centre crop, so every keypoint stays visible and pixel ↔ grid is an affine map per axis)
and normalised with the model's own mean and standard deviation; for a multi-encoder tower
(``zoo.multi``), each member's own, on the tower's input canvas.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from vlmsel_jax import zoo
from vlmsel_jax.zoo import multi

DEFAULT_LAYER = -2


def _check_tower(loaded: zoo.LoadedModel) -> None:
  if not callable(getattr(loaded.model, "patch_grid", None)):
    raise ValueError(f"model {loaded.name!r} ({type(loaded.model).__name__}) has no patch grid: "
                     "it is not a vision tower")


def default_layer(loaded: zoo.LoadedModel) -> int:
  """The tower's ``GRID_DEFAULT_LAYER``: -2 (second-to-last) for trained towers, -1 for a
  handcrafted tower, which has no classification head after its last grid to avoid."""
  _check_tower(loaded)
  return getattr(loaded.model, "GRID_DEFAULT_LAYER", DEFAULT_LAYER)


def _check_layer(loaded: zoo.LoadedModel, layer: int) -> None:
  if not -loaded.num_layers <= layer < loaded.num_layers:
    raise ValueError(f"layer {layer} is out of range for {loaded.name!r}: use "
                     f"{-loaded.num_layers} .. {loaded.num_layers - 1}")


def patch_grid(loaded: zoo.LoadedModel, pixels: jax.Array,
               layer: int | None = None) -> jax.Array:
  """Patch features of a batch of preprocessed images, on the encoder's native grid.

  Args:
    loaded: A vision model from ``zoo.load`` (ViT family, EfficientNet-Lite, pixel patches, HOG).
    pixels: (B, H, W, 3) preprocessed images, NHWC.
    layer: Index into the model's ``hidden_states``; None means ``default_layer(loaded)``: -2,
      the second-to-last layer (see the module docstring for what that is in a CNN), or -1 for
      a handcrafted tower.

  Returns:
    (B, h, w, D) float features, unnormalised.

  Raises:
    ValueError: a model that is not a vision tower, or a layer out of range.
  """
  _check_tower(loaded)
  layer = default_layer(loaded) if layer is None else layer
  _check_layer(loaded, layer)
  return loaded.model.patch_grid(pixels, layer)


def patch_grid_fn(loaded: zoo.LoadedModel,
                  layer: int | None = None) -> Callable[[jax.Array], jax.Array]:
  """``pixels -> patch_grid(loaded, pixels, layer)`` compiled with ``jax.jit`` (once per shape)."""
  _check_tower(loaded)
  layer = default_layer(loaded) if layer is None else layer
  _check_layer(loaded, layer)
  graphdef, state = nnx.split(loaded.model)

  @jax.jit
  def run(state, pixels):
    model = nnx.merge(graphdef, state)
    return patch_grid(dataclasses.replace(loaded, model=model), pixels, layer).astype(jnp.float32)

  return functools.partial(run, state)


def resize_for_grid(loaded: zoo.LoadedModel, image: np.ndarray) -> np.ndarray:
  """A uint8 (H, W, 3) image → the model's (H_in, W_in, 3) float32 input, uncropped.

  Resized (bicubic, PIL) to the preprocessing's ``image_size``, rescaled (to [0, 1]), normalised
  with its mean and standard deviation.
  """
  prep = loaded.preprocessing
  if prep is None:
    raise ValueError(f"model {loaded.name!r} has no image preprocessing (not a vision model)")
  return _resize_for(prep, image)


def _resize_for(prep, image: np.ndarray) -> np.ndarray:
  """``resize_for_grid`` with a preprocessing: each member's own of a multi-encoder tower,
  packed onto its canvas."""
  if isinstance(prep, multi.MultiPreprocessing):
    return prep.pack([_resize_for(member, image) for member in prep.members])
  height, width = prep.image_size
  pil = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  if (pil.height, pil.width) != (height, width):
    pil = pil.resize((width, height), resample=Image.Resampling.BICUBIC)
  x = np.asarray(pil, np.float32) * np.float32(getattr(prep, "rescale_factor", 1 / 255))
  mean = np.asarray(prep.mean, np.float32)
  std = np.asarray(prep.std, np.float32)
  return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
