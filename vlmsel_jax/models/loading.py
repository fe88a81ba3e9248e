"""Generic checkpoint -> Flax NNX loader, driven by each model family's key table.

A *source* is any iterable of ``(checkpoint key, numpy array)`` pairs plus the config dict that
describes the model; ``HFDirectory`` is the one for Hugging Face directories (``config.json`` and
a single or sharded safetensors checkpoint, or ``pytorch_model.bin`` files when there is none).
The loader builds the model abstractly with ``nnx.eval_shape`` (no memory for random weights),
routes every tensor through the family's key table, collects *every* problem (unexpected key,
missing parameter, shape mismatch) and raises once with the full list, then merges the state into
a real model.

Typical use::

  model = load_pretrained("/path/to/SmolLM2-135M", dtype="bfloat16")
  out = nnx.jit(model)(input_ids)
  features = out.hidden_states[-2]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from vlmsel_jax.models import bert, efficientnet, gemma3, llama, vit
# CheckpointFileError is defined with the torch-free .pth reader, which imports nothing of this
# package, so that the reader can raise it without an import cycle; it is this module's error too.
from vlmsel_jax.models.pth import CheckpointFileError, read_torch_state_dict
from vlmsel_jax.models.transforms import Transform, apply

KeyTable = Mapping[str, tuple[str | None, Transform]]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CheckpointError(ValueError):
  """A checkpoint whose tensors do not fit the model; the message lists every problem."""

  def __init__(self, source: str, problems: list[str]):
    self.problems = list(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"{source}: {len(self.problems)} problem(s) loading the checkpoint:\n{lines}")


class UnsupportedModelError(ValueError):
  """A config whose ``model_type`` / ``architectures`` no family here implements."""


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: how to read its config, build its module and map its checkpoint keys."""

  name: str
  model_types: tuple[str, ...]
  architectures: tuple[str, ...]
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  build: Callable[..., nnx.Module]  # build(config, *, dtype, rngs)
  key_table: Callable[[Any], KeyTable]


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
        name="vit",
        model_types=vit.SUPPORTED_MODEL_TYPES,
        architectures=vit.SUPPORTED_ARCHITECTURES,
        config_from_hf=vit.VitConfig.from_hf,
        build=vit.Vit,
        key_table=vit.key_table,
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


def read_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (key, array) for every tensor in one safetensors file, lazily.

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
    files: The weight files (``.safetensors`` or ``.bin``), in the order they are read.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_dir():
      raise CheckpointFileError(f"{self.path}: no such checkpoint directory")
    self.config = _read_json(self.path / "config.json")
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
    files = [self.path / name for name in sorted(set(weight_map.values()))]
    for f in files:
      if not f.is_file():
        raise CheckpointFileError(f"{f}: shard listed in {index.name} does not exist")
    return files

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    for f in self.files:
      yield from (read_safetensors(f) if f.suffix == ".safetensors" else
                  read_torch_state_dict(f))

  def __str__(self) -> str:
    return str(self.path)


def _resolve_dtype(dtype: Any) -> jnp.dtype:
  """Maps "float32" / "bfloat16" (or the jnp dtypes) to a jnp dtype; anything else is an error."""
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
  return jnp.dtype(_DTYPES[name])


def _flatten(tree: Mapping[Any, Any], prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
  """Flattens a nested dict to {key path: leaf}."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def _set_path(tree: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
  """Sets ``tree[path[0]][path[1]]... = value``."""
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _dotted(path: tuple[Any, ...]) -> str:
  return ".".join(str(p) for p in path)


def _route(table: KeyTable, key: str) -> tuple[str | None, Transform] | None:
  """Returns (NNX key, transform) for a checkpoint key, or None when no table entry matches."""
  for pattern, (template, transform) in table.items():
    m = re.fullmatch(pattern, key)
    if m:
      return (m.expand(template) if template is not None else None), transform
  return None


def assign_tensors(model: nnx.Module, table: KeyTable, tensors: Iterable[tuple[str, np.ndarray]],
                   *, source: str = "checkpoint") -> nnx.Module:
  """Fills an abstract (``nnx.eval_shape``) model from (key, array) pairs through ``table``.

  Every parameter of ``model`` must receive exactly one tensor of the right shape; tensors are
  cast to the parameter's dtype.

  Raises:
    CheckpointError: listing every unexpected key, missing parameter, duplicate and shape
      mismatch at once.
  """
  graphdef, abstract = nnx.split(model)
  state = nnx.to_pure_dict(abstract)
  wanted = _flatten(state)
  claimed: set[tuple[Any, ...]] = set()
  problems = []
  for key, tensor in tensors:
    routed = _route(table, key)
    if routed is None:
      problems.append(f"unexpected key {key!r} {tuple(tensor.shape)}: not in the key table")
      continue
    target, transform = routed
    if transform is Transform.SKIP:
      continue
    path = tuple(int(p) if p.isdigit() else p for p in target.split("."))
    if path not in wanted:
      problems.append(f"unexpected key {key!r} {tuple(tensor.shape)}: maps to {target}, "
                      "which this model config does not have")
      continue
    if path in claimed:
      problems.append(f"duplicate key {key!r}: {target} was already given a tensor")
      continue
    # Claimed even if the tensor turns out unusable, so a bad tensor is one problem, not two.
    claimed.add(path)
    try:
      value = apply(transform, np.asarray(tensor))
    except ValueError as e:
      problems.append(f"bad tensor {key!r} {tuple(tensor.shape)}: {e}")
      continue
    expected = wanted[path]
    if value.shape != expected.shape:
      problems.append(f"shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)} gives "
                      f"{target} {tuple(value.shape)}, the model needs {tuple(expected.shape)}")
      continue
    _set_path(state, path, jnp.asarray(value, dtype=expected.dtype))
  for path, expected in wanted.items():
    if path not in claimed:
      problems.append(f"missing parameter {_dotted(path)} {tuple(expected.shape)}: "
                      "no checkpoint key maps to it")
  if problems:
    raise CheckpointError(source, problems)
  return nnx.merge(graphdef, state)


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
  if Path(path).suffix.lower() == ".gguf":
    # Imported here because the GGUF source itself builds on this module.
    from vlmsel_jax.models import gguf  # pylint: disable=g-import-not-at-top
    return gguf.load_gguf_model(path, dtype=dtype)
  src = HFDirectory(path)
  return load_model(src.config, src, dtype=dtype, source=str(src))
