"""Reading a diffusers pipeline directory: its components, their weights, the noise schedule.

A pipeline directory (what ``DiffusionPipeline.save_pretrained`` writes, or a Hub snapshot) holds
``model_index.json`` and one sub-folder per component. The ones read here: ``vae/``
(``AutoencoderKL``), ``unet/`` (``UNet2DConditionModel``) or ``transformer/``
(``DiTTransformer2DModel``, or Stable Diffusion 3's ``SD3Transformer2DModel``), each a
``config.json`` with ``diffusion_pytorch_model.safetensors`` (or its sharded index), and
``scheduler/scheduler_config.json``: a DDPM-family scheduler's betas give the ``alphas_cumprod``
that noising uses, ``FlowMatchEulerDiscreteScheduler`` (SD3) its shifted sigmas. The text
encoders and tokenizers are not read.
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
from vlmsel_jax.models.diffusion import mmdit as mmdit_lib
from vlmsel_jax.models.diffusion import params
from vlmsel_jax.models.diffusion import unet as unet_lib
from vlmsel_jax.models.diffusion import vae as vae_lib
from vlmsel_jax.models.loading import read_safetensors

MODEL_INDEX = "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULE_TYPES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FLOW_MATCH_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
# What marks a pipeline as Stable Diffusion 3 (its denoiser is read by ``mmdit``): the
# transformer's class in model_index.json, or the pipeline's.
SD3_TRANSFORMERS = mmdit_lib.SUPPORTED_CLASSES
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                 "StableDiffusion3InpaintPipeline")
# DIFT's feature timestep for Stable Diffusion (``DDPM_DEFAULT_TIMESTEP`` of 1000) and that
# model's DDPM schedule: the noise level the flow-matching default is matched to.
DDPM_DEFAULT_TIMESTEP = 261
STABLE_DIFFUSION_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085,
                             "beta_end": 0.012, "beta_schedule": "scaled_linear"}
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


def flow_match_sigmas(config: Mapping[str, Any], source: str = "scheduler") -> np.ndarray:
  """The (num_train_timesteps,) float32 sigmas of a ``FlowMatchEulerDiscreteScheduler`` config,
  indexed by timestep: ``sigmas[t]`` is the noise fraction at timestep t (t = N - 1: pure noise).

  diffusers builds its training sigmas in descending order, in float32:
  ``s = linspace(1, N, N)[::-1] / N`` shifted to ``shift * s / (1 + (shift - 1) * s)``; timestep
  t here is its index N - 1 - t, the same numbers reversed.

  Raises:
    UnsupportedModelError: ``use_dynamic_shifting`` (sigmas shifted per image size at sampling
      time; the training sigmas alone do not say which noise level a timestep means).
  """
  if config.get("use_dynamic_shifting", False):
    raise UnsupportedModelError(f"{source}: use_dynamic_shifting is not supported")
  n = int(config.get("num_train_timesteps", 1000))
  shift = np.float32(config.get("shift", 1.0))
  s = np.linspace(1, n, n, dtype=np.float32) / np.float32(n)
  return (shift * s / (np.float32(1) + (shift - np.float32(1)) * s)).astype(np.float32)


def _dift_matched_flow_timestep(sigmas: np.ndarray) -> int:
  """The flow-matching timestep whose signal-to-noise ratio is closest to DIFT's t = 261 under
  Stable Diffusion's DDPM schedule.

  DDPM's sqrt(a) x0 + sqrt(1 - a) noise and flow matching's (1 - sigma) x0 + sigma noise have
  the same SNR when sigma / (1 - sigma) = sqrt((1 - a) / a): sigma = 0.420 for a =
  alphas_cumprod[261] = 0.656 (timestep 194 with SD3's shift 3). The timestep index itself means
  another noise level under every shift, so the DDPM default is not reused as a number.
  """
  a = float(alphas_cumprod(STABLE_DIFFUSION_SCHEDULE)[DDPM_DEFAULT_TIMESTEP])
  target = np.log((1 - a) / a) / 2
  sigma = np.clip(sigmas.astype(np.float64), 1e-9, 1 - 1e-9)  # sigma = 1: pure noise, SNR 0
  return int(np.argmin(np.abs(np.log(sigma / (1 - sigma)) - target)))


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """How a latent is noised to a timestep, and what the denoiser is told.

  Attributes:
    kind: "ddpm": ``sqrt(a[t]) x0 + sqrt(1 - a[t]) noise``, the model told t (``add_noise``);
      "flow_match": ``(1 - sigma[t]) x0 + sigma[t] noise``, the model told sigma[t] * N
      (``FlowMatchEulerDiscreteScheduler.scale_noise`` and its ``timesteps``).
    values: Per timestep, ``alphas_cumprod`` (ddpm) or sigmas (flow_match), float32 values.
  """

  kind: str
  values: tuple[float, ...]

  @classmethod
  def read(cls, config: Mapping[str, Any], source: str = "scheduler") -> NoiseSchedule:
    """From a ``scheduler_config.json`` dict: flow matching for ``FLOW_MATCH_SCHEDULERS``, the
    betas of a DDPM-family scheduler otherwise."""
    if config.get("_class_name") in FLOW_MATCH_SCHEDULERS:
      return cls.flow_match(flow_match_sigmas(config, source))
    return cls.ddpm(alphas_cumprod(config, source))

  @classmethod
  def ddpm(cls, alphas: np.ndarray) -> NoiseSchedule:
    return cls("ddpm", tuple(float(a) for a in np.asarray(alphas, np.float32)))

  @classmethod
  def flow_match(cls, sigmas: np.ndarray) -> NoiseSchedule:
    return cls("flow_match", tuple(float(s) for s in np.asarray(sigmas, np.float32)))

  @property
  def num_train_timesteps(self) -> int:
    return len(self.values)

  @property
  def default_timestep(self) -> int:
    """DIFT's 261 for DDPM; for flow matching, the timestep of the same signal-to-noise ratio
    (``_dift_matched_flow_timestep``)."""
    if self.kind == "ddpm":
      return DDPM_DEFAULT_TIMESTEP
    return _dift_matched_flow_timestep(np.asarray(self.values, np.float32))

  def check(self, timestep: int) -> int:
    """``timestep`` if the schedule has it; ValueError otherwise."""
    if not 0 <= timestep < self.num_train_timesteps:
      raise ValueError(f"timestep {timestep} is outside the schedule's 0 .. "
                       f"{self.num_train_timesteps - 1}")
    return int(timestep)

  def coefficients(self, timestep: int) -> tuple[float, float]:
    """(signal, noise) factors at ``timestep``, computed in float32 as diffusers does."""
    v = np.float32(self.values[self.check(timestep)])
    if self.kind == "ddpm":
      return float(v ** np.float32(0.5)), float((np.float32(1) - v) ** np.float32(0.5))
    return float(np.float32(1) - v), float(v)

  def model_timestep(self, timestep: int) -> float:
    """The number the denoiser's timestep embedding reads: t, or sigma[t] * N in float32."""
    if self.kind == "ddpm":
      return float(self.check(timestep))
    return float(np.float32(self.values[self.check(timestep)])
                 * np.float32(self.num_train_timesteps))


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


def load_mmdit(path: str | os.PathLike, dtype: Any = "float32") -> mmdit_lib.MMDiT:
  """The ``SD3Transformer2DModel`` in a component folder (e.g. ``<pipeline>/transformer``)."""
  src = Component(path)
  config = mmdit_lib.MMDiTConfig.from_diffusers(src.config, str(src.path / "config.json"))
  return _load(lambda **kw: mmdit_lib.MMDiT(config, **kw), params.mmdit_key_table(config), src,
               dtype)


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

  @property
  def is_sd3(self) -> bool:
    """Whether the transformer is Stable Diffusion 3's MMDiT (``SD3_TRANSFORMERS`` listed for
    it, or an ``SD3_PIPELINES`` pipeline), read by ``mmdit``; other transformers are DiTs."""
    if self.denoiser != "transformer":
      return False
    entry = self.model_index.get("transformer")
    listed = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 else None
    return (listed in SD3_TRANSFORMERS
            or self.model_index.get("_class_name") in SD3_PIPELINES)

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
