"""Model specs as users type them: the variant after ``@``, flag lists, file names, the zoo's error.

A *spec* names a model: a registered short name (``smollm2-135m``), a local path (a Hugging Face
directory or a llama.cpp ``.gguf`` file), or a Hugging Face Hub id
(``openai/clip-vit-base-patch16``, ``org/name@revision``). It may end in a *variant*: ``@layer=-2``, ``@res=160`` or both
(``@layer=-2,res=160``; a bare ``@-2`` is ``@layer=-2``). The Law of Vision Representation treats
an encoder's input resolution and feature layer as distinct candidate settings; a variant is one.
``layer`` becomes the model's default hidden state (extraction, the C score and the VLM's image
tokens read it); ``res`` resizes the input of a tower that takes any size (EfficientNet-Lite's
convolutions, pixel patches, HOG). The variant is part of the name
(``efficientnet-lite0@layer=-2,res=160``) and of the cache fingerprint, so each setting gets its
own feature bank. A diffusion-feature tower (a diffusers pipeline directory) also takes ``t``,
the timestep its latent is noised to (``@layer=0,t=100``). Vision specs joined by ``+``
(``a@layer=-2+b``, ``(a+b)@grid=16x16``) name a multi-encoder tower (``zoo.multi``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

from vlmsel_jax.zoo import hub

KINDS = ("vision", "text")


class ZooError(ValueError):
  """A model spec that cannot be resolved or loaded; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """A candidate setting of one model: which hidden state, at which input resolution.

  Attributes:
    layer: Hidden-state index that becomes the model's default layer (None: the model's own).
    res: Input side in pixels of a convolutional vision tower (None: its native size).
    t: Diffusion timestep of a diffusion-feature tower (``models.diffusion``; None: its
      default).
  """

  layer: int | None = None
  res: int | None = None
  t: int | None = None

  def __post_init__(self):
    if self.res is not None and not 8 <= self.res <= 4096:
      raise ZooError(f"res={self.res}: give an input side between 8 and 4096 pixels")
    if self.t is not None and self.t < 0:
      raise ZooError(f"t={self.t}: a diffusion timestep is not negative")

  @property
  def suffix(self) -> str:
    """``"@layer=-2,res=160"``; empty for the default setting."""
    parts = [f"{k}={v}" for k, v in (("layer", self.layer), ("res", self.res), ("t", self.t))
             if v is not None]
    return "@" + ",".join(parts) if parts else ""

  def identity(self) -> dict[str, int | None]:
    """The fields a cache fingerprint records; ``t`` only when set, so that every other model
    keeps the fingerprint it had before ``t`` existed."""
    out = {"layer": self.layer, "res": self.res}
    if self.t is not None:
      out["t"] = self.t
    return out


_VARIANT_RE = re.compile(r"-?\d+|([a-z_]+=[^,=@]+)(,[a-z_]+=[^,=@]+)*")


# The one layer of a multi-encoder tower (``models.multi_tower.LAYER``).
MULTI_LAYER = -1


def is_multi(spec: str) -> bool:
  """Whether ``spec`` names a multi-encoder tower (``zoo.multi``): members joined by ``+``
  (``a@layer=-2+b``), or a parenthesised group (``(a+b)@grid=16x16``).

  A spec that is an existing path as a whole is one model, '+' or not; zoo names and Hub ids
  never contain '+'.
  """
  spec = spec.strip()
  return (("+" in spec or spec.startswith("(")) and
          not os.path.exists(os.path.expanduser(spec)))


def split_variant(spec: str) -> tuple[str, Variant]:
  """``"efficientnet-lite0@layer=-2,res=160"`` → ("efficientnet-lite0", Variant(-2, 160)).

  ``spec@-2`` is ``spec@layer=-2``. A spec without ``@``, or one that is an existing path as a
  whole, has the default variant. A Hub id may name a revision before the variant
  (``org/name@v1.0@layer=-2`` → ("org/name@v1.0", Variant(-2))); a revision that is a bare integer
  would read as a layer, so give such a one as ``org/name@<rev>@layer=-1``. A multi-encoder spec
  (``is_multi``) is returned whole with ``Variant(layer=MULTI_LAYER)``: its members' variants
  are ``zoo.multi``'s to read.

  Raises:
    ZooError: an unknown key, a value that is not an integer, or a key given twice.
  """
  spec = spec.strip()
  if is_multi(spec):
    # A multi-encoder tower (``zoo.multi``): its members name their own layers, and the tower
    # has the one layer that holds them all.
    return spec, Variant(layer=MULTI_LAYER)
  base, at, text = spec.rpartition("@")
  if not at or os.path.exists(os.path.expanduser(spec)):
    return spec, Variant()
  if hub.is_repo_id(base) and not _VARIANT_RE.fullmatch(text):
    # "org/name@revision": the '@' names a Hub revision, not a setting.
    return spec, Variant()
  if not base or not _VARIANT_RE.fullmatch(text):
    raise ZooError(f"model spec {spec!r}: after '@' give key=value pairs such as "
                   "layer=-2,res=160 (or a bare layer index)")
  if re.fullmatch(r"-?\d+", text):
    return base, Variant(layer=int(text))
  values: dict[str, int] = {}
  for item in text.split(","):
    key, _, value = item.partition("=")
    if key not in ("layer", "res", "t"):
      raise ZooError(f"model spec {spec!r}: unknown setting {key!r} (known: layer, res, t)")
    if key in values:
      raise ZooError(f"model spec {spec!r}: {key} is given twice")
    try:
      values[key] = int(value)
    except ValueError:
      raise ZooError(f"model spec {spec!r}: {key}={value!r} is not an integer") from None
  return base, Variant(**values)


def candidate_list(items: Sequence[str]) -> list[str]:
  """Specs from a comma-split flag, with each variant's own commas put back.

  absl list flags split ``a@layer=-2,res=160,b`` into ``a@layer=-2``, ``res=160``, ``b``; an
  item of the form ``key=value`` continues the spec before it when that one has a variant.
  """
  specs: list[str] = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    # A multi-encoder spec may go on after a member's variant: "a@layer=-2,res=160+b".
    if specs and "@" in specs[-1] and re.fullmatch(r"[a-z_]+=[^,=@/+]*(\+.*)?", item):
      specs[-1] += "," + item
    else:
      specs.append(item)
  return specs


def file_stem(name: str) -> str:
  """A model name as a file name (bank, cache entry): '/' of a Hub id becomes '--'.

  Hub repo ids never contain '--', so distinct names stay distinct.
  """
  return name.replace("/", "--")
