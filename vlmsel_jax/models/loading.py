"""The model families, and loading any checkpoint source as one of them.

``FAMILIES`` lists every family: how it reads a transformers config, builds its NNX module and maps
its checkpoint keys (its ``params.key_table``). ``load_model`` builds the module a config describes
abstractly with ``nnx.eval_shape`` (no memory for random weights) and fills it from a *source*, any
iterable of ``(checkpoint key, numpy array)`` pairs, through ``checkpoint.assign_tensors`` (every
problem collected, raised once). The sources:

* ``HFDirectory`` (here): a Hugging Face directory, ``config.json`` and a single or sharded
  safetensors checkpoint, or ``pytorch_model.bin`` files when there is none;
* ``pth.TorchStateDict``: a PyTorch ``.pth`` state dict, read without torch;
* ``gguf.GGUFFile``: a llama.cpp ``.gguf`` file, which also carries its config and tokenizer.

Typical use::

  model = load_pretrained("/path/to/SmolLM2-135M", dtype="bfloat16")
  out = nnx.jit(model)(input_ids)
  features = out.hidden_states[-2]
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from vlmsel_jax.models import bert, efficientnet, gemma3, llama, vit
from vlmsel_jax.models import siglip2
from vlmsel_jax.models import convnext
from vlmsel_jax.models import gemma
from vlmsel_jax.models import internvit
from vlmsel_jax.models import eva02
from vlmsel_jax.models import phi3, qwen3
from vlmsel_jax.models import qwen2_5_vl
from vlmsel_jax.models.checkpoint import (
    CheckpointFileError,
    KeyTable,
    UnsupportedModelError,
    assign_tensors,
)
from vlmsel_jax.models.gguf import GGUFFile
from vlmsel_jax.models.pth import TorchStateDict, read_torch_state_dict

__all__ = [
    "FAMILIES",
    "Family",
    "HFDirectory",
    "family_for",
    "load_gguf",
    "load_model",
    "load_pretrained",
    "load_torch_checkpoint",
    "is_timm_config",
    "load_timm_pretrained",
    "read_safetensors",
    "supported_architectures",
    "supported_model_types",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: how to read its config, build its module and map its checkpoint keys."""

  name: str
  model_types: tuple[str, ...]
  architectures: tuple[str, ...]
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  build: Callable[..., nnx.Module]  # build(config, *, dtype, rngs)
  key_table: Callable[[Any], KeyTable]
  # reads_key(config)(key): whether a Hugging Face directory's tensor is read at all; None: every
  # one. For checkpoints mostly made of a part the family skips (a whole VLM of which the vision
  # tower is built), so that the skipped part is never loaded into memory.
  reads_key: Callable[[Any], Callable[[str], bool]] | None = None


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=llama.SUPPORTED_MODEL_TYPES,
        architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
        config_from_hf=llama.LlamaConfig.from_hf,
        build=llama.Llama,
        key_table=llama.key_table,
    ),
    Family(
        name="gemma3",
        model_types=gemma3.SUPPORTED_MODEL_TYPES,
        architectures=gemma3.SUPPORTED_ARCHITECTURES,
        config_from_hf=gemma3.Gemma3Config.from_hf,
        build=gemma3.Gemma3,
        key_table=gemma3.key_table,
    ),
    Family(
        name="gemma",
        model_types=gemma.SUPPORTED_MODEL_TYPES,
        architectures=gemma.SUPPORTED_ARCHITECTURES,
        config_from_hf=gemma.GemmaConfig.from_hf,
        build=gemma.Gemma,
        key_table=gemma.key_table,
    ),
    Family(
        name="phi3",
        model_types=phi3.SUPPORTED_MODEL_TYPES,
        architectures=phi3.SUPPORTED_ARCHITECTURES,
        config_from_hf=phi3.Phi3Config.from_hf,
        build=phi3.Phi3,
        key_table=phi3.key_table,
    ),
    Family(
        name="qwen3",
        model_types=qwen3.SUPPORTED_MODEL_TYPES,
        architectures=qwen3.SUPPORTED_ARCHITECTURES,
        config_from_hf=qwen3.Qwen3Config.from_hf,
        build=qwen3.Qwen3,
        key_table=qwen3.key_table,
    ),
    Family(
        name="vit",
        model_types=vit.SUPPORTED_MODEL_TYPES,
        architectures=vit.SUPPORTED_ARCHITECTURES,
        config_from_hf=vit.VitConfig.from_hf,
        build=vit.Vit,
        key_table=vit.key_table,
    ),
    Family(
        name="siglip2",
        model_types=siglip2.SUPPORTED_MODEL_TYPES,
        architectures=siglip2.SUPPORTED_ARCHITECTURES,
        config_from_hf=siglip2.config_from_hf,
        build=siglip2.Siglip2Vit,
        key_table=siglip2.key_table,
    ),
    Family(
        name="bert",
        model_types=bert.SUPPORTED_MODEL_TYPES,
        architectures=bert.SUPPORTED_ARCHITECTURES,
        config_from_hf=bert.BertConfig.from_hf,
        build=bert.Bert,
        key_table=bert.key_table,
    ),
    Family(
        name="efficientnet_lite",
        model_types=efficientnet.SUPPORTED_MODEL_TYPES,
        architectures=efficientnet.SUPPORTED_ARCHITECTURES,
        config_from_hf=efficientnet.EfficientNetConfig.from_dict,
        build=efficientnet.EfficientNetLite,
        key_table=efficientnet.key_table,
    ),
    Family(
        name="convnext",
        model_types=convnext.SUPPORTED_MODEL_TYPES,
        architectures=convnext.SUPPORTED_ARCHITECTURES,
        config_from_hf=convnext.ConvNextConfig.from_hf,
        build=convnext.ConvNext,
        key_table=convnext.key_table,
    ),
    Family(
        name="internvit",
        model_types=internvit.SUPPORTED_MODEL_TYPES,
        architectures=internvit.SUPPORTED_ARCHITECTURES,
        config_from_hf=internvit.InternVitConfig.from_hf,
        build=internvit.InternVit,
        key_table=internvit.key_table,
        reads_key=internvit.reads_key,
    ),
    Family(
        name="qwen2_5_vl",
        model_types=qwen2_5_vl.SUPPORTED_MODEL_TYPES,
        architectures=qwen2_5_vl.SUPPORTED_ARCHITECTURES,
        config_from_hf=qwen2_5_vl.Qwen25VisionConfig.from_hf,
        build=qwen2_5_vl.Qwen25VisionTower,
        key_table=qwen2_5_vl.key_table,
        reads_key=qwen2_5_vl.reads_key,
    ),
)


def supported_model_types() -> list[str]:
  """Every ``model_type`` some family can load, sorted."""
  return sorted(t for f in FAMILIES for t in f.model_types)


def supported_architectures() -> list[str]:
  """Every ``architectures`` entry some family can load, sorted."""
  return sorted(a for f in FAMILIES for a in f.architectures)


def family_for(config: Mapping[str, Any], source: str = "config") -> Family:
  """Returns the family implementing ``config``, or raises ``UnsupportedModelError``.

  The ``model_type`` must be supported; when ``architectures`` is given, one of its entries must
  be too (a ``LlamaForSequenceClassification`` head, say, is not a causal LM here).
  """
  model_type = config.get("model_type")
  archs = list(config.get("architectures") or [])
  for family in FAMILIES:
    if model_type in family.model_types:
      if archs and not set(archs) & set(family.architectures):
        raise UnsupportedModelError(
            f"{source}: architectures {archs} are not supported; supported architectures: "
            f"{', '.join(supported_architectures())}")
      return family
  raise UnsupportedModelError(
      f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
      f"supported model_type: {', '.join(supported_model_types())}")


def read_safetensors(path: str | os.PathLike, reads_key: Callable[[str], bool] | None = None
                     ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (key, array) for every tensor in one safetensors file (only those whose key
  ``reads_key`` accepts, when given; the others are not read), lazily.

  Raises:
    CheckpointFileError: the file is missing, truncated or otherwise unreadable.
  """
  path = Path(path)
  if not path.is_file():
    raise CheckpointFileError(f"{path}: no such checkpoint file")
  try:
    # safe_open checks the header against the file size, so truncation is caught here.
    with safe_open(str(path), framework="numpy") as f:
      for key in f.keys():
        if reads_key is None or reads_key(key):
          yield key, f.get_tensor(key)
  except SafetensorError as e:
    raise CheckpointFileError(
        f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from None


def _read_json(path: Path) -> dict[str, Any]:
  """Reads a JSON object, turning a missing or malformed file into a one-line error."""
  if not path.is_file():
    raise CheckpointFileError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointFileError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise CheckpointFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


class HFDirectory:
  """A Hugging Face model directory as a source of (key, numpy array) pairs.

  Holds ``config.json`` and either ``model.safetensors`` or a sharded checkpoint described by
  ``model.safetensors.index.json``; without either, PyTorch's ``pytorch_model.bin`` or the shards
  ``pytorch_model.bin.index.json`` lists (read without torch, see ``pth``). Safetensors win when
  both are there, as in transformers. Iterating yields every tensor of every shard.

  Attributes:
    path: The directory.
    config: The parsed ``config.json``.
    files: The weight files (``.safetensors`` or ``.bin``), in the order they are read. A shard
      the index lists must exist when it is read; ``select`` reads only the shards holding keys
      it accepts, so the others may be absent (the Hub fetches only a VLM's vision shards).
    weight_map: A sharded checkpoint's key -> shard file name (its index); None otherwise.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_dir():
      raise CheckpointFileError(f"{self.path}: no such checkpoint directory")
    self.config = _read_json(self.path / "config.json")
    self.weight_map: dict[str, str] | None = None
    self._index_name = ""
    self.files = self._weight_files()

  def _weight_files(self) -> list[Path]:
    for single_name in ("model.safetensors", "pytorch_model.bin"):
      index = self.path / f"{single_name}.index.json"
      if index.is_file():
        return self._shards(index)
      single = self.path / single_name
      if single.is_file():
        return [single]
    raise CheckpointFileError(
        f"{self.path / 'model.safetensors'}: no such file (nor model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)")

  def _shards(self, index: Path) -> list[Path]:
    """The shard files an index's ``weight_map`` names, each once, sorted."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointFileError(f"{index}: has no 'weight_map'")
    self.weight_map, self._index_name = weight_map, index.name
    return [self.path / name for name in sorted(set(weight_map.values()))]

  def _present(self, files: list[Path]) -> list[Path]:
    for f in files:
      if not f.is_file():
        raise CheckpointFileError(f"{f}: shard listed in {self._index_name} does not exist")
    return files

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    for f in self._present(self.files):
      yield from (read_safetensors(f) if f.suffix == ".safetensors" else
                  read_torch_state_dict(f))

  def shards_for(self, reads_key: Callable[[str], bool]) -> list[Path]:
    """The weight files holding a key ``reads_key`` accepts (all of an unsharded checkpoint)."""
    if self.weight_map is None:
      return self.files
    needed = {name for key, name in self.weight_map.items() if reads_key(key)}
    return [f for f in self.files if f.name in needed]

  def select(self, reads_key: Callable[[str], bool]) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors whose key ``reads_key`` accepts; shards the index shows to hold none of them
    are not opened, safetensors files leave the others unread (``pytorch_model.bin`` files are
    read whole and filtered)."""
    for f in self._present(self.shards_for(reads_key)):
      if f.suffix == ".safetensors":
        yield from read_safetensors(f, reads_key)
      else:
        yield from ((key, t) for key, t in read_torch_state_dict(f) if reads_key(key))

  def __str__(self) -> str:
    return str(self.path)


def _resolve_dtype(dtype: Any) -> jnp.dtype:
  """Maps "float32" / "bfloat16" (or the jnp dtypes) to a jnp dtype; anything else is an error."""
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
  return jnp.dtype(_DTYPES[name])


def load_model(config: Mapping[str, Any], tensors: Iterable[tuple[str, np.ndarray]], *,
               dtype: Any = "float32", source: str = "checkpoint") -> nnx.Module:
  """Builds the model ``config`` (a transformers config dict) describes, with weights ``tensors``.

  Args:
    config: A transformers-style config dict (``model_type`` picks the family).
    tensors: (checkpoint key, numpy array) pairs, e.g. an ``HFDirectory``.
    dtype: Parameter and activation dtype, "float32" or "bfloat16".
    source: Names the checkpoint in error messages.

  Raises:
    UnsupportedModelError: no family implements the config.
    CheckpointError: the tensors do not fit the model (every problem listed).
  """
  family = family_for(config, source)
  model_config = family.config_from_hf(config)
  jdtype = _resolve_dtype(dtype)
  abstract = nnx.eval_shape(lambda: family.build(model_config, dtype=jdtype, rngs=nnx.Rngs(0)))
  if family.reads_key is not None and isinstance(tensors, HFDirectory):
    tensors = tensors.select(family.reads_key(model_config))
  return assign_tensors(abstract, family.key_table(model_config), tensors, source=source)


def load_pretrained(path: str | os.PathLike, *, dtype: Any = "float32") -> nnx.Module:
  """Loads a Hugging Face model directory (config.json + weights) as an NNX model.

  Args:
    path: The directory ``save_pretrained`` wrote (single file or sharded; safetensors, else
      ``pytorch_model.bin``), or a llama.cpp ``.gguf`` file (see ``vlmsel_jax.models.gguf``).
    dtype: "float32" or "bfloat16".

  Raises:
    CheckpointFileError: a file is missing, truncated or corrupt (the message names it).
    UnsupportedModelError: the config's model_type / architectures are not implemented.
    CheckpointError: the tensors do not fit the model (every problem listed).
  """
  src = GGUFFile(path) if Path(path).suffix.lower() == ".gguf" else HFDirectory(path)
  return load_model(src.config, src, dtype=dtype, source=str(src))


def load_gguf(path: str | os.PathLike, dtype: Any = "float32"
              ) -> tuple[nnx.Module, dict[str, Any], Any]:
  """Loads a GGUF file of an architecture ``gguf.SUPPORTED_ARCHITECTURES`` lists (llama, qwen2,
  gemma, gemma2, gemma3): (NNX model, transformers-style config, tokenizer).

  Args:
    path: The ``.gguf`` file.
    dtype: Parameter and activation dtype, "float32" or "bfloat16"; quantized tensors are
      dequantized to float32 first.

  Returns:
    The NNX ``Llama`` / ``Gemma`` / ``Gemma3``, the config dict ``GGUFFile`` built from the
    metadata, and the file's tokenizer (a transformers ``PreTrainedTokenizerFast``, or
    ``GemmaTokenizer``).

  Raises:
    CheckpointFileError: the file is missing, truncated or corrupt (the message names it).
    UnsupportedModelError: not a supported architecture, a feature the module lacks, or a
      tokenizer other than byte-level BPE (Gemma's SentencePiece aside);
      ``gguf.UnsupportedQuantizationError`` for tensor types ``gguf`` cannot dequantize.
    CheckpointError: the tensors do not fit the model (every problem listed).
  """
  src = GGUFFile(path)
  # The tokenizer first: it is cheap and fails fast, before any tensor is dequantized.
  tokenizer = src.tokenizer()
  model = load_model(src.config, src, dtype=dtype, source=str(src))
  return model, dict(src.config), tokenizer


def load_torch_checkpoint(path: str | os.PathLike, config: Mapping[str, Any], *,
                          dtype: Any = "float32") -> nnx.Module:
  """Loads a PyTorch state dict file as the NNX model ``config`` describes.

  Args:
    path: The ``.pth`` / ``.pt`` file.
    config: The config dict of the model (its ``model_type`` picks the family), e.g.
      ``{"model_type": "efficientnet_lite", "variant": "lite0"}``.
    dtype: "float32" or "bfloat16".

  Raises:
    CheckpointFileError: the file is missing, truncated, corrupt or holds more than tensors and
      containers (the message names it).
    UnsupportedModelError: no family implements the config.
    CheckpointError: the tensors do not fit the model (every problem listed).
  """
  source = TorchStateDict(path)
  return load_model(config, source, dtype=dtype, source=str(source))


# timm Hub directories: a config.json with the timm ``architecture`` (and ``model_args``,
# ``pretrained_cfg``) instead of a transformers ``model_type``, and timm's own state-dict keys.
# The EVA-02 towers are the timm architectures implemented here.


def is_timm_config(config: Mapping[str, Any]) -> bool:
  """Whether a ``config.json`` is a timm model's: an ``architecture``, no ``model_type``."""
  return "model_type" not in config and isinstance(config.get("architecture"), str)


def load_timm_pretrained(path: str | os.PathLike, *, dtype: Any = "float32") -> nnx.Module:
  """Loads a timm Hub directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``).

  Raises:
    CheckpointFileError: a file is missing, truncated or corrupt (the message names it).
    UnsupportedModelError: not a timm config, or an architecture other than the EVA-02 towers
      (``eva02.ARCHITECTURES``) or ``model_args`` they cannot take.
    CheckpointError: the tensors do not fit the model (every problem listed).
  """
  src = HFDirectory(path)
  if not is_timm_config(src.config):
    raise UnsupportedModelError(f"{src}: not a timm model directory (config.json has no "
                                "'architecture', or has a transformers 'model_type')")
  if not eva02.is_eva02(src.config):
    raise UnsupportedModelError(
        f"{src}: timm architecture {src.config['architecture']!r} is not supported; supported "
        f"timm architectures: {', '.join(eva02.ARCHITECTURES)}")
  try:
    model_config = eva02.Eva02Config.from_timm(src.config)
  except ValueError as e:
    raise UnsupportedModelError(f"{src}: {e}") from None
  jdtype = _resolve_dtype(dtype)
  abstract = nnx.eval_shape(lambda: eva02.Eva02(model_config, dtype=jdtype, rngs=nnx.Rngs(0)))
  return assign_tensors(abstract, eva02.key_table(model_config), src, source=str(src))
