"""Weights on disk → a ``LoadedModel``, one loader per format.

Every loader is ``loader(path, name, dtype) -> LoadedModel``: ``load_hf_dir`` for a Hugging Face
directory (a ViT with its image processor's preprocessing, a decoder LLM or BERT with its
tokenizer), ``load_gguf`` for a llama.cpp file (model and tokenizer from the file), and the loaders
of registered models with files of their own: a GGUF file shipped as chunks, an EfficientNet-Lite
``.pth`` state dict, and the towers without weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import transformers

from vlmsel_jax.models import efficientnet, handcrafted, loading
from vlmsel_jax.zoo import features, packages
from vlmsel_jax.zoo.features import LoadedModel
from vlmsel_jax.zoo.preprocessing import (
    HALF,
    CropFractionPreprocessing,
    default_preprocessing,
    preprocessing_from_hf,
)
from vlmsel_jax.zoo.specs import ZooError


def load_hf_dir(path: Path, name: str, dtype: str) -> LoadedModel:
  """A Hugging Face model directory of the vit, llama, gemma3 or bert family."""
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
    return features.vit_model(name, model, preprocessing)
  if family.name in ("llama", "gemma3"):
    return features.llama_model(name, model, _hf_tokenizer(path))
  if family.name == "bert":
    return features.bert_model(name, model, _hf_tokenizer(path))
  raise ZooError(f"{path}: no extraction is defined for the {family.name} family")


def _hf_tokenizer(path: Path):
  if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    raise ZooError(f"{path}: no tokenizer (tokenizer.json) in the model directory")
  try:
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ZooError(f"{path}: cannot load the tokenizer ({' '.join(str(e).split())})") from None


def load_gguf(path: Path, name: str, dtype: str) -> LoadedModel:
  """A llama.cpp ``.gguf`` file: a decoder LLM with the tokenizer its metadata describes."""
  model, _, tokenizer = loading.load_gguf(path, dtype=dtype)
  return features.llama_model(name, model, tokenizer)


def load_chunked_gguf(filename: str, parts: Sequence[tuple[str, str, str]],
                      chat_template: str | None, path: Path, name: str, dtype: str
                      ) -> LoadedModel:
  """Loads a GGUF file shipped as chunks: ``parts`` is (package, module, file in the module).

  The chunks are joined once into ``cache_root()/gguf/<filename>``. ``chat_template`` is given to
  a tokenizer whose file carries none (a pretrained, not instruction-tuned, checkpoint), so that
  VQA training can render conversations.
  """
  del path  # The registered package holds no weights itself; the chunk packages do.
  chunks = [packages.package_dir(package, module) / rel for package, module, rel in parts]
  target = packages.assemble_chunks(chunks, packages.cache_root() / "gguf" / filename)
  loaded = load_gguf(target, name, dtype)
  if chat_template is not None and getattr(loaded.tokenizer, "chat_template", None) is None:
    loaded.tokenizer.chat_template = chat_template
  return loaded


def load_efficientnet_lite(variant: str, path: Path, name: str, dtype: str) -> LoadedModel:
  """Loads an EfficientNet-Lite ``.pth`` state dict with its variant's eval preprocessing."""
  model = packages.load_lite(variant, path, dtype=dtype)
  info = efficientnet.preprocess_info(model.config)
  if info.resample != "bicubic":
    raise ZooError(f"{path}: {variant} expects a {info.resample!r} resize; only bicubic is "
                   "implemented")
  preprocessing = CropFractionPreprocessing(size=info.image_size,
                                            crop_fraction=info.crop_fraction,
                                            mean=tuple(info.mean), std=tuple(info.std))
  return features.efficientnet_model(name, model, preprocessing)


def load_pixel_patches(path: Path, name: str, dtype: str) -> LoadedModel:
  """16x16 patches of a 224 px image scaled to [-1, 1] (a ViT-B/16's grid, without the ViT)."""
  del path, dtype  # No weights; the output is float32.
  model = handcrafted.PixelPatches(handcrafted.PixelPatchesConfig(patch_size=16))
  preprocessing = CropFractionPreprocessing(size=224, crop_fraction=1.0, mean=HALF, std=HALF)
  return features.handcrafted_model(name, model, preprocessing)


def load_hog(path: Path, name: str, dtype: str) -> LoadedModel:
  """Dalal-Triggs HOG (9 bins, 8 px cells, 2x2-cell L2-Hys blocks) of a 128 px image in [0, 1]."""
  del path, dtype
  model = handcrafted.Hog(handcrafted.HogConfig())
  preprocessing = CropFractionPreprocessing(size=128, crop_fraction=1.0, mean=(0.0, 0.0, 0.0),
                                            std=(1.0, 1.0, 1.0))
  return features.handcrafted_model(name, model, preprocessing)
