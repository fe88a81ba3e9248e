"""Reading a diffusers pipeline directory: its components, their weights, the noise schedule.

A pipeline directory (what ``DiffusionPipeline.save_pretrained`` writes, or a Hub snapshot) holds
``model_index.json`` and one sub-folder per component. The ones read here: ``vae/``
(``AutoencoderKL``), ``unet/`` (``UNet2DConditionModel``) or ``transformer/``
(``DiTTransformer2DModel``), each a ``config.json`` with ``diffusion_pytorch_model.safetensors``
(or its sharded index), and ``scheduler/scheduler_config.json``, whose betas give the
``alphas_cumprod`` that noising uses. The text encoders and tokenizers are not read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmsel_jax.models.checkpoint import (
    CheckpointFileError,
    UnsupportedModelError,
    assign_tensors,
)
from vlmsel_jax.models.diffusion import dit as dit_lib
from vlmsel_jax.models.diffusion import params
from vlmsel_jax.models.diffusion import unet as unet_lib
from vlmsel_jax.models.diffusion import vae as vae_lib
from vlmsel_jax.models.loading import read_safetensors

MODEL_INDEX = "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULE_TYPES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_pipeline_dir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a directory with a ``model_index.json``."""
  return (Path(path) / MODEL_INDEX).is_file()


def read_json(path: Path) -> dict[str, Any]:
  """A JSON object from ``path``; a missing or malformed file is a ``CheckpointFileError``."""
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


class Component:
  """One model sub-folder of a pipeline as a source of (key, numpy array) pairs.

  Attributes:
    path: The sub-folder.
    config: Its parsed ``config.json``.
    files: Its safetensors file(s), in reading order.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_dir():
      raise CheckpointFileError(f"{self.path}: no such component directory")
    self.config = read_json(self.path / "config.json")
    index = self.path / f"{WEIGHTS}.index.json"
    if index.is_file():
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFileError(f"{index}: has no 'weight_map'")
      self.files = [self.path / name for name in sorted(set(weight_map.values()))]
    else:
      self.files = [self.path / WEIGHTS]
    for f in self.files:
      if not f.is_file():
        raise CheckpointFileError(f"{f}: no such file (diffusers' safetensors weights)")

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    for f in self.files:
      yield from read_safetensors(f)

  def __str__(self) -> str:
    return str(self.path)


def alphas_cumprod(config: Mapping[str, Any], source: str = "scheduler") -> np.ndarray:
  """The (num_train_timesteps,) float32 ``alphas_cumprod`` of a DDPM-family scheduler config.

  ``linear`` / ``scaled_linear`` betas are spaced in float64 and rounded to float32 (diffusers
  spaces them in float32 with ``torch.linspace``: the two differ by at most a float32 ulp), then
  ``cumprod(1 - betas)`` in float32 as diffusers does; ``trained_betas`` are taken as given.

  Raises:
    UnsupportedModelError: another beta schedule, or zero-terminal-SNR rescaling.
  """
  n = int(config.get("num_train_timesteps", 1000))
  start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
  schedule = config.get("beta_schedule", "linear")
  if config.get("rescale_betas_zero_snr", False):
    raise UnsupportedModelError(f"{source}: rescale_betas_zero_snr is not supported")
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], np.float32)
  elif schedule == "linear":
    betas = np.linspace(start, end, n).astype(np.float32)
  elif schedule == "scaled_linear":
    betas = np.square(np.linspace(start ** 0.5, end ** 0.5, n).astype(np.float32))
  elif schedule == "squaredcos_cap_v2":
    def alpha_bar(t: float) -> float:
      return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
                        for i in range(n)], np.float32)
  else:
    raise UnsupportedModelError(f"{source}: beta_schedule {schedule!r} is not one of "
                                f"{', '.join(SCHEDULE_TYPES)}")
  return np.cumprod(np.float32(1.0) - betas, dtype=np.float32)


def _dtype(dtype: Any) -> Any:
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def _load(build, table, source: Component, dtype: Any) -> nnx.Module:
  abstract = nnx.eval_shape(lambda: build(dtype=_dtype(dtype)))
  return assign_tensors(abstract, table, source, source=str(source))


def load_vae(path: str | os.PathLike, dtype: Any = "float32") -> vae_lib.VaeEncoder:
  """The ``AutoencoderKL`` encoder in a component folder (e.g. ``<pipeline>/vae``)."""
  src = Component(path)
  config = vae_lib.VaeConfig.from_diffusers(src.config, str(src))
  return _load(lambda **kw: vae_lib.VaeEncoder(config, **kw), params.vae_key_table(config), src,
               dtype)


def load_unet(path: str | os.PathLike, dtype: Any = "float32") -> unet_lib.UNet2DCondition:
  """The ``UNet2DConditionModel`` in a component folder (e.g. ``<pipeline>/unet``)."""
  src = Component(path)
  config = unet_lib.UNetConfig.from_diffusers(src.config, str(src))
  return _load(lambda **kw: unet_lib.UNet2DCondition(config, **kw),
               params.unet_key_table(config), src, dtype)


def load_dit(path: str | os.PathLike, dtype: Any = "float32") -> dit_lib.DiT:
  """The ``DiTTransformer2DModel`` in a component folder (e.g. ``<pipeline>/transformer``)."""
  src = Component(path)
  config = dit_lib.DiTConfig.from_diffusers(src.config, str(src))
  return _load(lambda **kw: dit_lib.DiT(config, **kw), params.dit_key_table(config), src, dtype)


@dataclasses.dataclass(frozen=True)
class PipelineLayout:
  """Where a pipeline's parts are.

  Attributes:
    path: The pipeline directory.
    denoiser: "unet" or "transformer": the sub-folder of the denoising model.
    model_index: The parsed ``model_index.json``.
  """

  path: Path
  denoiser: str
  model_index: dict[str, Any]

  @classmethod
  def read(cls, path: str | os.PathLike) -> PipelineLayout:
    """Reads ``model_index.json``; the denoiser is ``unet`` if listed, else ``transformer``.

    Raises:
      CheckpointFileError: no (valid) ``model_index.json``.
      UnsupportedModelError: neither a UNet nor a transformer, or no VAE.
    """
    path = Path(path)
    index = read_json(path / MODEL_INDEX)
    listed = {k for k, v in index.items() if not k.startswith("_") and v and v[0] is not None}
    if "vae" not in listed:
      raise UnsupportedModelError(f"{path}: the pipeline has no vae")
    for denoiser in ("unet", "transformer"):
      if denoiser in listed:
        return cls(path=path, denoiser=denoiser, model_index=index)
    raise UnsupportedModelError(f"{path}: the pipeline has neither a unet nor a transformer "
                                f"(components: {', '.join(sorted(listed))})")
