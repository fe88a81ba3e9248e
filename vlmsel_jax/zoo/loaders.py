"""Weights on disk → a ``LoadedModel``, one loader per format.

Every loader is ``loader(path, name, dtype) -> LoadedModel``: ``load_hf_dir`` for a Hugging Face
directory (a ViT with its image processor's preprocessing, a decoder LLM or BERT with its
tokenizer), ``load_gguf`` for a llama.cpp file (model and tokenizer from the file),
``load_open_clip_dir`` for an OpenCLIP directory of a ConvNeXt tower, and the loaders
of registered models with files of their own: a GGUF file shipped as chunks, an EfficientNet-Lite
``.pth`` state dict, and the towers without weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import transformers

from vlmsel_jax.models import efficientnet, handcrafted, loading
from vlmsel_jax.models import siglip2
from vlmsel_jax.models import diffusion
from vlmsel_jax.models.convnext import open_clip as open_clip_dir
from vlmsel_jax.zoo import features, packages
from vlmsel_jax.zoo.chat_format import with_family_chat_template
from vlmsel_jax.zoo.features import LoadedModel
from vlmsel_jax.zoo.preprocessing import (
    BICUBIC,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropFractionPreprocessing,
    Preprocessing,
    default_preprocessing,
    preprocessing_from_hf,
    preprocessing_from_qwen2_vl,
    preprocessing_from_timm,
)
from vlmsel_jax.zoo.preprocessing import preprocessing_from_convnext, preprocessing_from_open_clip
from vlmsel_jax.zoo.specs import ZooError


def load_hf_dir(path: Path, name: str, dtype: str) -> LoadedModel:
  """A Hugging Face model directory of the vit, llama, gemma3, gemma, phi3, qwen3, bert or
  convnext family."""
  src = loading.HFDirectory(path)
  if loading.is_timm_config(src.config):
    return load_timm_dir(path, name, dtype)
  family = loading.family_for(src.config, str(path))
  model = loading.load_model(src.config, src, dtype=dtype, source=str(src))
  if family.name == "siglip2":
    return features.vit_model(name, model, naflex_grid_preprocessing(path, model.config))
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
  if family.name == "internvit":
    return features.vit_model(name, model, _internvit_preprocessing(path, model.config))
  if family.name == "qwen2_5_vl":
    return features.qwen2_5_vl_model(name, model, _qwen2_5_vl_preprocessing(path, model.config))
  if family.name in ("llama", "gemma3", "gemma", "phi3", "qwen3"):
    return features.llama_model(name, model,
                                with_family_chat_template(model, _hf_tokenizer(path)))
  if family.name == "convnext":
    return features.convnext_model(name, model, _convnext_preprocessing(path, model.config))
  if family.name == "bert":
    return features.bert_model(name, model, _hf_tokenizer(path))
  raise ZooError(f"{path}: no extraction is defined for the {family.name} family")


def _internvit_preprocessing(path: Path, config) -> Preprocessing:
  """An InternViT's ``preprocessor_config.json`` (GotOcr2ImageProcessor fields), over InternVL's
  documented defaults: a bicubic resize to the model size, ImageNet mean / std.

  Extraction takes the whole image as one tile: ``crop_to_patches`` (InternVL's dynamic tiling for
  the VLM) is not applied.
  """
  default = Preprocessing(resize_to=config.image_size, resample=BICUBIC, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)
  processor_file = path / "preprocessor_config.json"
  if not processor_file.is_file():
    return default
  with open(processor_file, encoding="utf-8") as f:
    return preprocessing_from_hf(json.load(f), default, str(processor_file))


def _qwen2_5_vl_preprocessing(path: Path, config) -> Preprocessing:
  """A Qwen2.5-VL checkpoint's ``preprocessor_config.json`` (Qwen2VLImageProcessor fields) at the
  zoo's fixed square side (``preprocessing_from_qwen2_vl``)."""
  processor_file = path / "preprocessor_config.json"
  processor = None
  if processor_file.is_file():
    with open(processor_file, encoding="utf-8") as f:
      processor = json.load(f)
  return preprocessing_from_qwen2_vl(processor, config.patch_size, config.spatial_merge_size,
                                     source=str(processor_file))


def load_timm_dir(path: Path, name: str, dtype: str) -> LoadedModel:
  """A timm Hub directory (``config.json`` with ``architecture``): an EVA-02 tower with timm's
  eval preprocessing from its ``pretrained_cfg``."""
  model = loading.load_timm_pretrained(path, dtype=dtype)
  config = loading.HFDirectory(path).config
  preprocessing = preprocessing_from_timm(config.get("pretrained_cfg") or {},
                                          str(path / "config.json"))
  if preprocessing.image_size != model.config.image_size:
    raise ZooError(f"{path}: the preprocessing makes {preprocessing.image_size} images but the "
                   f"model takes {model.config.image_size}")
  return features.vit_model(name, model, preprocessing)


def naflex_grid_preprocessing(path: Path, config) -> Preprocessing:
  """A SigLIP2 NaFlex tower's preprocessing in the zoo: one fixed square grid for every image.

  The VLM needs a static number of image tokens and a jitted batch one shape, so every image is
  resized (aspect ratio not kept) to the square grid transformers' ``Siglip2ImageProcessor`` gives
  a square image: ``isqrt(max_num_patches)`` patches a side (16 x 16 for the Hub's 256), resampled
  and normalised as ``preprocessor_config.json`` says. ``@res=`` picks another side
  (``resolver``); ``models.siglip2.NaflexPreprocessing`` is the aspect-keeping pipeline.
  """
  processor_file = path / "preprocessor_config.json"
  processor = {}
  if processor_file.is_file():
    with open(processor_file, encoding="utf-8") as f:
      processor = json.load(f)
  try:
    naflex = siglip2.NaflexPreprocessing.from_hf(processor)
  except ValueError as e:
    raise ZooError(f"{processor_file}: {e}") from None
  if (naflex.patch_size, naflex.patch_size) != tuple(config.patch_size):
    raise ZooError(f"{processor_file}: patch_size {naflex.patch_size} but the model's patches are "
                   f"{config.patch_size}")
  side = naflex.square_size
  return Preprocessing(resize_to=(side, side), resample=naflex.resample,
                       rescale_factor=naflex.rescale_factor, mean=naflex.mean, std=naflex.std)


def _hf_tokenizer(path: Path):
  if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    raise ZooError(f"{path}: no tokenizer (tokenizer.json) in the model directory")
  try:
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ZooError(f"{path}: cannot load the tokenizer ({' '.join(str(e).split())})") from None


def load_gguf(path: Path, name: str, dtype: str) -> LoadedModel:
  """A llama.cpp ``.gguf`` file: a decoder LLM with the tokenizer its metadata describes (a
  Gemma file without a chat template gets Gemma's turn format, ``chat_format``)."""
  model, _, tokenizer = loading.load_gguf(path, dtype=dtype)
  return features.llama_model(name, model, with_family_chat_template(model, tokenizer))


def load_chunked_gguf(filename: str, parts: Sequence[tuple[str, str, str]], path: Path,
                      name: str, dtype: str) -> LoadedModel:
  """Loads a GGUF file shipped as chunks: ``parts`` is (package, module, file in the module).

  The chunks are joined once into ``cache_root()/gguf/<filename>``.
  """
  del path  # The registered package holds no weights itself; the chunk packages do.
  chunks = [packages.package_dir(package, module) / rel for package, module, rel in parts]
  target = packages.assemble_chunks(chunks, packages.cache_root() / "gguf" / filename)
  return load_gguf(target, name, dtype)


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


def load_diffusion_pipeline(path: Path, name: str, dtype: str) -> LoadedModel:
  """A diffusers pipeline directory (``model_index.json``) as a diffusion-feature tower
  (``models.diffusion``): a centred square crop resized to the model's native side (the
  denoiser's latent size times the VAE's downscale), scaled to [-1, 1] as Stable Diffusion's
  image processor does; ``res`` takes any other side."""
  tower, info = diffusion.load_tower(path, dtype=dtype)
  preprocessing = CropFractionPreprocessing(size=info.image_size, crop_fraction=1.0, mean=HALF,
                                            std=HALF)
  return features.diffusion_model(name, tower, preprocessing)


def load_hog(path: Path, name: str, dtype: str) -> LoadedModel:
  """Dalal-Triggs HOG (9 bins, 8 px cells, 2x2-cell L2-Hys blocks) of a 128 px image in [0, 1]."""
  del path, dtype
  model = handcrafted.Hog(handcrafted.HogConfig())
  preprocessing = CropFractionPreprocessing(size=128, crop_fraction=1.0, mean=(0.0, 0.0, 0.0),
                                            std=(1.0, 1.0, 1.0))
  return features.handcrafted_model(name, model, preprocessing)


def _convnext_preprocessing(path: Path, config):
  """A transformers ConvNeXt's ``preprocessor_config.json`` (ConvNextImageProcessor), or the hub
  checkpoints' settings at the config's image size without one."""
  processor_file = path / "preprocessor_config.json"
  processor = None
  if processor_file.is_file():
    with open(processor_file, encoding="utf-8") as f:
      processor = json.load(f)
  return preprocessing_from_convnext(processor, config.image_size, str(processor_file))


def load_open_clip_dir(path: Path, name: str, dtype: str) -> LoadedModel:
  """An OpenCLIP model directory (``open_clip_config.json`` and ``open_clip_model.safetensors``
  or ``open_clip_pytorch_model.bin``, a Hub repo's layout) whose vision tower is a timm ConvNeXt:
  the tower with its projection head, and OpenCLIP's eval preprocessing."""
  src = open_clip_dir.OpenClipDirectory(path)
  model = loading.load_model(src.config, src, dtype=dtype, source=str(src.file))
  preprocessing = preprocessing_from_open_clip(src.preprocess_cfg, model.config.image_size,
                                               str(path / open_clip_dir.CONFIG_FILE))
  return features.convnext_model(name, model, preprocessing)

