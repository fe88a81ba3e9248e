"""Hugging Face Hub ids (``openai/clip-vit-base-patch16``) as local checkpoint directories.

A Hub model is fetched with ``huggingface_hub.snapshot_download`` into the standard Hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), limited to what a
checkpoint directory needs: the configs, the tokenizer files and chat template, and the weights
(safetensors; of a whole VLM whose vision tower is the model, Qwen2.5-VL or InternVL, only the
shards holding the tower; ``pytorch_model*.bin`` only when the repo has no safetensors; for an OpenCLIP repo
without a transformers config, ``open_clip_model.safetensors``, else
``open_clip_pytorch_model.bin``; for a diffusers pipeline, ``model_index.json`` and the parts the
diffusion-feature tower reads: ``vae/``, ``unet/`` or ``transformer/``, ``scheduler/``).
``HF_HUB_OFFLINE=1`` and ``HF_TOKEN`` work exactly as they do
for transformers, since huggingface_hub reads them: a cached model loads offline, a missing one is
one line that says how to fetch it.

Typical use::

  snap = snapshot("openai/clip-vit-base-patch16", revision=None)
  snap.path    # .../models--openai--clip-vit-base-patch16/snapshots/<commit>
  snap.commit  # the resolved commit hash, part of every cache key derived from the model

huggingface_hub is imported when a snapshot is asked for, not with this module.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from pathlib import Path

# Repo ids as the Hub accepts them: "org/name", each part of letters, digits, '-', '_', '.',
# at most 96 characters, not starting with '-' or '.', without '--' or '..'.
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}"
_REPO_ID_RE = re.compile(rf"{_PART}/{_PART}")

# Every file of a checkpoint directory other than the weights.
CONFIG_PATTERNS = (
    "config.json", "generation_config.json", "preprocessor_config.json",
    "processor_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "open_clip_config.json", "model_index.json",
)
# An OpenCLIP repo's config (model_cfg, preprocess_cfg) and weights of the whole CLIP model, in
# OpenCLIP's order of preference. The weights are fetched only for a repo without a transformers
# config.json: repos that have both (laion's ViTs) would otherwise be downloaded twice.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHT_PATTERNS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# transformers' weight file names; other files of a repo (tf_model.h5, flax_model.msgpack,
# onnx/...) are not fetched, nor OpenCLIP's where a config.json is (see OPEN_CLIP_*).
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_PATTERNS = ("model.safetensors", SAFETENSORS_INDEX, "model-*-of-*.safetensors")
PYTORCH_BIN_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json",
                        "pytorch_model-*-of-*.bin")
# A diffusers pipeline (``model_index.json``, no ``config.json``): the components
# ``models.diffusion`` reads, in float32 safetensors (not the text encoders, not fp16 variants),
# and the empty-prompt conditioning a repo prepared for feature extraction may carry.
DIFFUSERS_CONFIG = "model_index.json"
DIFFUSERS_PATTERNS = tuple(
    f"{part}/{name}" for part in ("vae", "unet", "transformer")
    for name in ("config.json", "diffusion_pytorch_model.safetensors",
                 "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model-*-of-*.safetensors")) + (
    "scheduler/scheduler_config.json", "empty_prompt_embeds.npy",
    "empty_prompt_pooled_embeds.npy")


class HubError(ValueError):
  """A Hub id that cannot be made a local checkpoint directory; one line says why and what to do."""


@dataclasses.dataclass(frozen=True)
class HubSnapshot:
  """A Hub model in the local cache.

  Attributes:
    repo_id: "org/name".
    revision: The branch, tag or commit asked for (None: the default branch).
    commit: The commit hash it resolved to.
    path: The snapshot directory (config.json, tokenizer files, weights).
  """

  repo_id: str
  revision: str | None
  commit: str
  path: Path


def is_repo_id(text: str) -> bool:
  """Whether ``text`` has the form of a Hub repo id (``org/name``)."""
  return bool(_REPO_ID_RE.fullmatch(text)) and "--" not in text and ".." not in text


def split_revision(text: str) -> tuple[str, str | None]:
  """``"org/name@v1.0"`` → ("org/name", "v1.0"); ``"org/name"`` → ("org/name", None).

  Raises:
    HubError: ``text`` has an '@' but what precedes it is not a repo id, or nothing follows it.
  """
  repo_id, at, revision = text.partition("@")
  if not at:
    return text, None
  if not is_repo_id(repo_id) or not revision:
    raise HubError(f"model spec {text!r}: expected org/name@revision")
  return repo_id, revision


def _has(path: Path, patterns: tuple[str, ...]) -> bool:
  return any(fnmatch.fnmatch(p.name, pat) for p in path.iterdir() for pat in patterns)


def _download_open_clip(path: Path, download) -> Path:
  """An OpenCLIP repo (``open_clip_config.json``, no ``config.json``): its safetensors weights,
  else its ``open_clip_pytorch_model.bin``."""
  path = download(OPEN_CLIP_WEIGHT_PATTERNS[:1])
  if not _has(path, OPEN_CLIP_WEIGHT_PATTERNS[:1]):
    path = download(OPEN_CLIP_WEIGHT_PATTERNS[1:])
  return path


def _tower_shards(path: Path) -> tuple[str, ...] | None:
  """The safetensors shards a sharded checkpoint's family reads, when it reads only a part of the
  checkpoint (``loading.Family.reads_key``: the vision tower of a whole Qwen2.5-VL or InternVL,
  whose language model fills most shards); None for any other checkpoint, which is fetched
  whole."""
  index, config_file = path / SAFETENSORS_INDEX, path / "config.json"
  if not (index.is_file() and config_file.is_file()):
    return None
  from vlmsel_jax.models import loading  # pylint: disable=g-import-not-at-top
  try:
    with open(config_file, encoding="utf-8") as f:
      config = json.load(f)
    family = loading.family_for(config, str(config_file))
    if family.reads_key is None:
      return None
    reads = family.reads_key(family.config_from_hf(config))
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    return tuple(sorted({name for key, name in weight_map.items() if reads(key)}))
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    # Not a family we load, or files it cannot read: fetched whole, and the loader says why.
    return None


def _cache_dir() -> str:
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  return constants.HF_HUB_CACHE


def _fetch_hint(repo_id: str, revision: str | None) -> str:
  rev = f" --revision {revision}" if revision else ""
  return f"fetch it where the Hub is reachable: `hf download {repo_id}{rev}`"


def snapshot(repo_id: str, revision: str | None = None) -> HubSnapshot:
  """The cached snapshot of ``repo_id`` at ``revision``, downloading what is missing if allowed.

  Only the files a checkpoint directory needs are fetched (see ``CONFIG_PATTERNS`` and the
  weight patterns). With ``HF_HUB_OFFLINE=1`` nothing is requested from the network.

  Raises:
    HubError: the model is not cached and cannot be fetched (offline, no network), does not
      exist or is gated (the message mentions HF_TOKEN), the revision does not exist, or the
      cached snapshot lacks its config or weights. The message names the id and what to do.
  """
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top

  name = repo_id + (f"@{revision}" if revision else "")
  offline = bool(constants.HF_HUB_OFFLINE)

  def download(patterns: tuple[str, ...]) -> Path:
    return Path(snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                  allow_patterns=list(CONFIG_PATTERNS + patterns)))

  try:
    # The configs and the shard index first: they tell whether every shard is needed.
    path = download((SAFETENSORS_INDEX,))
    shards = _tower_shards(path)
    path = download(SAFETENSORS_PATTERNS if shards is None else (SAFETENSORS_INDEX,) + shards)
    if not _has(path, SAFETENSORS_PATTERNS):
      # Many repos carry only pytorch_model.bin; it is fetched only when there are no safetensors.
      path = download(PYTORCH_BIN_PATTERNS)
    if not (path / "config.json").is_file() and (path / OPEN_CLIP_CONFIG).is_file():
      path = _download_open_clip(path, download)
    if not (path / "config.json").is_file() and (path / DIFFUSERS_CONFIG).is_file():
      path = download(DIFFUSERS_PATTERNS)
  except errors.GatedRepoError:
    raise HubError(f"model {name!r} is gated on the Hugging Face Hub: accept its licence on the "
                   "Hub and set HF_TOKEN") from None
  except errors.RepositoryNotFoundError:
    raise HubError(f"model {name!r}: no such model on the Hugging Face Hub (a private one needs "
                   "HF_TOKEN)") from None
  except errors.RevisionNotFoundError:
    raise HubError(f"model {name!r}: the Hub repo has no revision {revision!r}") from None
  except errors.IncompleteSnapshotError:
    raise HubError(f"model {name!r}: the cached snapshot in {_cache_dir()} is incomplete; "
                   f"{_fetch_hint(repo_id, revision)}") from None
  except errors.LocalEntryNotFoundError:
    why = "HF_HUB_OFFLINE=1" if offline else "the Hub could not be reached"
    raise HubError(f"model {name!r} is not in the Hugging Face cache ({_cache_dir()}) and {why}; "
                   f"{_fetch_hint(repo_id, revision)}") from None
  except errors.HFValidationError as e:
    raise HubError(f"model {name!r}: {' '.join(str(e).split())}") from None
  except errors.HfHubHTTPError as e:
    detail = " ".join(str(e).split()[:30])
    raise HubError(f"model {name!r}: the Hugging Face Hub answered {detail}") from None
  if not (path / "config.json").is_file() and (path / OPEN_CLIP_CONFIG).is_file():
    if not _has(path, OPEN_CLIP_WEIGHT_PATTERNS):
      raise HubError(f"model {name!r}: the cached OpenCLIP snapshot {path} has no weights "
                     f"({' or '.join(OPEN_CLIP_WEIGHT_PATTERNS)}); "
                     f"{_fetch_hint(repo_id, revision)}")
    return HubSnapshot(repo_id=repo_id, revision=revision, commit=path.name, path=path)
  if not (path / "config.json").is_file() and (path / DIFFUSERS_CONFIG).is_file():
    found = [part for part in ("vae", "unet", "transformer")
             if (path / part / "diffusion_pytorch_model.safetensors").is_file()
             or (path / part / "diffusion_pytorch_model.safetensors.index.json").is_file()]
    if "vae" not in found or len(found) < 2:
      raise HubError(f"model {name!r}: the cached diffusers snapshot {path} lacks the safetensors "
                     "weights of its vae and unet / transformer; "
                     f"{_fetch_hint(repo_id, revision)}")
    return HubSnapshot(repo_id=repo_id, revision=revision, commit=path.name, path=path)
  if not (path / "config.json").is_file():
    raise HubError(f"model {name!r}: the cached snapshot {path} has no config.json (not a "
                   f"transformers model, or a partial download); {_fetch_hint(repo_id, revision)}")
  if not _has(path, SAFETENSORS_PATTERNS + PYTORCH_BIN_PATTERNS):
    raise HubError(f"model {name!r}: the cached snapshot {path} has no weights (model.safetensors "
                   f"or pytorch_model.bin); {_fetch_hint(repo_id, revision)}")
  return HubSnapshot(repo_id=repo_id, revision=revision, commit=path.name, path=path)
