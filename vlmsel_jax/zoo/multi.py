"""Multi-encoder vision towers: ``clip-vit-large-patch14+dinov2-large`` style specs.

The members' patch grids are resampled to one common grid and concatenated along the feature
dimension (the Law of Vision Representation's "C+D" tower, Cambrian's encoder combinations); the
tower is a ``models.multi_tower.MultiTower`` and goes everywhere a single tower does: extraction,
the scores, the C score, training and the ground truth.

Spec grammar:

* ``a+b+c``: the members, each any vision spec with its own variant
  (``clip-vit-large-patch14@layer=-2+dinov2-large@layer=-1``; ``a+b@layer=-2`` sets b's layer
  only). A member path cannot contain '+' (link it under another name); zoo names and Hub ids
  never do.
* ``(a+b)@grid=RxC`` (or ``grid=N`` for N x N): the common grid. A parenthesised group takes no
  other setting: its layer and resolution are its members' (``(a@layer=-2+b)@grid=16x16``).
  ``(a+b)`` alone is ``a+b``; groups do not nest.

Design (what each consumer sees):

* Input: one (H, W, 3) array, the *canvas* ``MultiPreprocessing`` makes: each member's own
  preprocessing of the raw image (its size, crop, mean and std), the inputs side by side left to
  right, top-aligned, zero elsewhere. An (h, w, 3) array is what every consumer already handles
  (jit-compiled batched extraction, the VLM's ``pixels`` and its ``image_size``, the training
  and evaluation batches, the C score's ``resize_for_grid``), so none of them needs to know a
  tower has members; the tower cuts the canvas apart with static slices. Stacking the inputs
  along the channels instead would break every (…, 3) shape those consumers build.
* Grid (the VLM's image tokens, the C score): each member's grid at its own layer (its
  ``@layer=``, else its ``GRID_DEFAULT_LAYER``: the second-to-last layer of a trained tower, as
  LLaVA reads it), resampled bilinearly (antialiased, half-pixel centres; see
  ``models.multi_tower``) to the common grid, concatenated in member order. The common grid is
  the FIRST member's, unless ``@grid=`` names one: the order says which encoder sets the token
  count (put CLIP first for CLIP's 24x24 = 576 tokens, as LLaVA-style C+D towers do), and the
  others are resampled onto it, as Cambrian and the Law paper bring every encoder to one token
  count.
* Layers: the members' layers are fixed by the spec, so the tower has one layer, -1 (also 0):
  ``split_variant`` gives a multi spec ``Variant(layer=-1)``, so a training run's tower layer
  (``loop.tower_layer``) is -1, and ``--layer`` / ``--vision_layer`` next to a multi spec is
  refused as a second layer, as for any spec that names its own.
* Pooled features (feature banks, the scores that read them): the concatenation of each member's
  own default pooled features (its default layer, its ``@layer=`` when given, and its default
  pooling: CLS of a CLIP, the spatial mean of HOG), so that bank(a+b) = [bank(a) | bank(b)] and a
  combination's scores compare with its members'. The only pooling is ``"members"``.
* Cache key: ``MultiResolved.fingerprint`` holds every member's fingerprint (files, sizes, mtimes,
  variant, Hub commit) and the common grid, so a changed member invalidates the bank.
* Names: the members' names joined by '+' (``(…)@grid=RxC`` when a grid is named); as a training
  candidate paired with an LLM the vision part is parenthesised (``(a+b)+llm``,
  ``candidate_pair_name``) so that ``split_candidate_pair_name`` reads every such name back
  unambiguously.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vlmsel_jax.models import multi_tower
from vlmsel_jax.zoo.features import LoadedModel
from vlmsel_jax.zoo.preprocessing import ImagePreprocessing
from vlmsel_jax.zoo.specs import (
    MULTI_LAYER,
    Variant,
    ZooError,
    file_stem,
    is_multi,
    split_variant,
)

# The one pooling of a multi-encoder tower: each member's own, concatenated.
POOLING = "members"
_GRID_RE = re.compile(r"(\d+)(?:x(\d+))?")


@dataclasses.dataclass(frozen=True)
class MultiSpec:
  """A multi-encoder spec taken apart.

  Attributes:
    members: The member specs, variants included, in order.
    grid: The common (rows, columns) the spec names; None: the first member's grid.
  """

  members: tuple[str, ...]
  grid: tuple[int, int] | None = None


def _matching_paren(text: str) -> int:
  """Index of the ')' closing the '(' at ``text[0]``."""
  depth = 0
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return i
  raise ZooError(f"model spec {text!r}: '(' without its ')'")


def _parse_group_variant(spec: str, text: str) -> tuple[int, int] | None:
  """The settings after ``(a+b)@``: ``grid=RxC`` (or ``grid=N``) only."""
  grid = None
  for item in text.split(","):
    key, eq, value = item.strip().partition("=")
    if not eq:
      raise ZooError(f"model spec {spec!r}: after ')@' give grid=RxC (e.g. grid=16x16)")
    if key in ("layer", "res"):
      raise ZooError(f"model spec {spec!r}: a multi-encoder tower's {key} is its members': give "
                     f"it per member, e.g. (a@{key}=...+b@{key}=...)@grid=16x16")
    if key != "grid":
      raise ZooError(f"model spec {spec!r}: unknown setting {key!r} of a multi-encoder tower "
                     "(known: grid)")
    if grid is not None:
      raise ZooError(f"model spec {spec!r}: grid is given twice")
    match = _GRID_RE.fullmatch(value.strip())
    if not match:
      raise ZooError(f"model spec {spec!r}: grid={value!r} is not RxC (e.g. 16x16) nor N")
    rows = int(match.group(1))
    cols = int(match.group(2) or rows)
    if not (1 <= rows <= 1024 and 1 <= cols <= 1024):
      raise ZooError(f"model spec {spec!r}: grid={value}: give 1 to 1024 rows and columns")
    grid = (rows, cols)
  return grid


def parse(spec: str) -> MultiSpec:
  """``"(a@layer=-2+b)@grid=16x16"`` → MultiSpec(("a@layer=-2", "b"), (16, 16)).

  Raises:
    ZooError: fewer than two members, an empty member, a nested or unclosed group, a group
      setting other than grid, or a malformed grid.
  """
  spec = spec.strip()
  body, grid = spec, None
  if spec.startswith("("):
    close = _matching_paren(spec)
    body, rest = spec[1:close], spec[close + 1:].strip()
    if rest:
      if not rest.startswith("@") or "+" in rest:
        raise ZooError(f"model spec {spec!r}: a group ends with ')' or ')@grid=RxC'; groups do "
                       "not combine with further members")
      grid = _parse_group_variant(spec, rest[1:])
  if "(" in body or ")" in body:
    raise ZooError(f"model spec {spec!r}: multi-encoder groups do not nest; list every member "
                   "once: (a+b+c)")
  members = tuple(m.strip() for m in body.split("+"))
  if any(not m for m in members):
    raise ZooError(f"model spec {spec!r}: an empty member between '+' signs")
  if len(members) < 2:
    raise ZooError(f"model spec {spec!r}: a multi-encoder tower needs two or more members "
                   "joined by '+'")
  return MultiSpec(members, grid)


def multi_name(members: Sequence[str], grid: tuple[int, int] | None) -> str:
  """The canonical name: ``a+b``, or ``(a+b)@grid=RxC`` when a grid is named."""
  joined = "+".join(members)
  return f"({joined})@grid={grid[0]}x{grid[1]}" if grid is not None else joined


def map_members(spec: str, fn: Callable[[str], str]) -> str:
  """``spec`` with ``fn`` applied to every member spec (e.g. a path shortened to its stem)."""
  parsed = parse(spec)
  return multi_name([fn(m) for m in parsed.members], parsed.grid)


def base_spec(spec: str) -> str:
  """A spec that names no layer, for a run recipe whose layer is ``--vision_layer``: ``spec``
  without its variant, or a multi-encoder spec's first member without its variant (a multi spec
  always names its one layer)."""
  if is_multi(spec):
    spec = parse(spec).members[0]
  return split_variant(spec)[0]


def _is_one_group(name: str) -> bool:
  """``(…)`` or ``(…)@settings`` without a '+' after the group."""
  if not name.startswith("("):
    return False
  try:
    close = _matching_paren(name)
  except ZooError:
    return False
  return "+" not in name[close + 1:]


def candidate_pair_name(vision: str, llm: str) -> str:
  """The name of a (vision, LLM) training candidate: ``<vision>+<llm>``, the vision name in
  parentheses when it has a '+' of its own (``(a+b)+llm``), so ``split_candidate_pair_name``
  reads it back."""
  if "+" in vision and not _is_one_group(vision):
    vision = f"({vision})"
  return f"{vision}+{llm}"


def split_candidate_pair_name(name: str) -> tuple[str, str]:
  """``candidate_pair_name``'s (vision, LLM) back: the vision part ends at the first '+' after
  its group when it starts with '(', else at the first '+'.

  ``efficientnet-lite2@layer=-5+gemma3-270m`` → ("efficientnet-lite2@layer=-5", "gemma3-270m");
  ``(a+b)@grid=4x4+smollm2-135m`` → ("(a+b)@grid=4x4", "smollm2-135m").

  Raises:
    ValueError: a name without a '+' after its vision part.
  """
  start = _matching_paren(name) + 1 if name.startswith("(") else 0
  cut = name.find("+", start)
  if cut < 0 or cut == len(name) - 1:
    raise ValueError(f"candidate {name!r} is not <vision>+<llm>")
  return name[:cut], name[cut + 1:]


@dataclasses.dataclass(frozen=True)
class MultiPreprocessing:
  """Each member's own preprocessing of one image, their inputs side by side on one canvas.

  The canvas is (max member height, sum of member widths, 3) float32: member i's input at rows
  ``[0, h_i)`` and columns ``[left_i, left_i + w_i)`` (``boxes``), zeros elsewhere, which no
  member reads. ``models.multi_tower.MultiTower`` cuts it apart with the same boxes.

  Attributes:
    members: The members' preprocessings, in member order.
  """

  members: tuple[ImagePreprocessing, ...]

  @property
  def boxes(self) -> tuple[tuple[int, int, int, int], ...]:
    """(top, left, height, width) of each member's input on the canvas."""
    boxes, left = [], 0
    for prep in self.members:
      height, width = prep.image_size
      boxes.append((0, left, height, width))
      left += width
    return tuple(boxes)

  @property
  def image_size(self) -> tuple[int, int]:
    return (max(p.image_size[0] for p in self.members),
            sum(p.image_size[1] for p in self.members))

  def to_dict(self) -> dict[str, Any]:
    return {"recipe": "multi_encoder_canvas", "members": [p.to_dict() for p in self.members]}

  def pack(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Members' (h_i, w_i, 3) inputs → the canvas."""
    if len(inputs) != len(self.members):
      raise ValueError(f"{len(inputs)} inputs for {len(self.members)} members")
    canvas = np.zeros((*self.image_size, 3), np.float32)
    for x, (top, left, height, width) in zip(inputs, self.boxes):
      if x.shape != (height, width, 3):
        raise ValueError(f"a member input of shape {x.shape}; its box is {height}x{width}x3")
      canvas[top:top + height, left:left + width] = x
    return canvas

  def __call__(self, image: Image.Image) -> np.ndarray:
    """A PIL image → the (H, W, 3) float32 canvas of every member's own preprocessing of it."""
    return self.pack([np.asarray(p(image), np.float32) for p in self.members])


def _multi_features(model, inputs, layer, pooling, *, member_features, member_settings):
  """``FeatureFn`` of a ``MultiTower``: each member's own pooled features, concatenated."""
  if layer not in (MULTI_LAYER, MULTI_LAYER + multi_tower.NUM_LAYERS):
    raise ValueError(f"a multi-encoder tower has one layer ({MULTI_LAYER}); got {layer}")
  if pooling != POOLING:
    raise ValueError(f"pooling {pooling!r}: a multi-encoder tower pools each member its own way "
                     f"({POOLING!r})")
  pieces = model.member_pixels(inputs["pixels"])
  return jnp.concatenate(
      [fn(member, {"pixels": x}, member_layer, member_pooling).astype(jnp.float32)
       for fn, (member_layer, member_pooling), member, x
       in zip(member_features, member_settings, model.members, pieces)], axis=-1)


def _grid_layer(resolved, loaded: LoadedModel) -> int:
  """A member's grid layer: its ``@layer=``, else its tower's ``GRID_DEFAULT_LAYER``."""
  if not callable(getattr(loaded.model, "patch_grid", None)):
    raise ZooError(f"multi-encoder member {resolved.spec!r} ({type(loaded.model).__name__}) has "
                   "no patch grid")
  if resolved.variant.layer is not None:
    return resolved.variant.layer
  return getattr(loaded.model, "GRID_DEFAULT_LAYER", -2)


@dataclasses.dataclass(frozen=True)
class MultiResolved:
  """A multi-encoder spec located on disk; nothing loaded yet. Used as a ``resolver.Resolved``
  is (``name``, ``file_stem``, ``kind``, ``variant``, ``fingerprint()``, ``load()``).

  Attributes:
    spec: What the user gave.
    name: The canonical name (``multi_name`` of the members' names).
    members: Each member's ``Resolved``.
    grid: The common grid the spec names (None: the first member's).
    kind: "vision".
    variant: ``Variant(layer=MULTI_LAYER)``: the tower's one layer.
    hub: None (the members carry their own).
  """

  spec: str
  name: str
  members: tuple[Any, ...]
  grid: tuple[int, int] | None = None
  kind: str = "vision"
  variant: Variant = Variant(layer=MULTI_LAYER)
  hub: None = None

  @property
  def file_stem(self) -> str:
    return file_stem(self.name)

  def fingerprint(self) -> dict[str, Any]:
    """Every member's fingerprint (a changed member invalidates a bank) and the common grid."""
    return {"spec": self.spec, "multi": {"version": 1, "grid": self.grid,
                                         "members": [m.fingerprint() for m in self.members]}}

  def load(self, dtype: str = "float32") -> LoadedModel:
    """Loads every member and assembles the tower (see the module docstring)."""
    loaded = [m.load(dtype) for m in self.members]
    layers = [_grid_layer(r, m) for r, m in zip(self.members, loaded)]
    preprocessing = MultiPreprocessing(tuple(m.preprocessing for m in loaded))
    grid = self.grid
    if grid is None:
      height, width = loaded[0].preprocessing.image_size
      probe = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
      shape = jax.eval_shape(lambda x: loaded[0].model.patch_grid(x, layers[0]), probe).shape
      grid = (shape[1], shape[2])
    tower = multi_tower.MultiTower([m.model for m in loaded], layers, preprocessing.boxes, grid)
    features = functools.partial(
        _multi_features, member_features=tuple(m.features for m in loaded),
        member_settings=tuple((m.default_layer, m.default_pooling) for m in loaded))
    return LoadedModel(name=self.name, kind="vision", model=tower, features=features,
                       num_layers=multi_tower.NUM_LAYERS, poolings=(POOLING,),
                       default_layer=MULTI_LAYER, default_pooling=POOLING,
                       preprocessing=preprocessing)


def resolve_multi(spec: str, resolve_one: Callable[[str], Any]) -> MultiResolved:
  """Locates every member of a multi-encoder spec with ``resolve_one`` (``resolver.resolve``).

  Raises:
    ZooError: a malformed spec (``parse``), a member that does not resolve (named), or one that
      is not a vision model.
  """
  if not is_multi(spec):
    raise ZooError(f"model spec {spec!r} is not a multi-encoder spec (a+b)")
  parsed = parse(spec)
  members = []
  for member in parsed.members:
    try:
      resolved = resolve_one(member)
    except ZooError as e:
      raise ZooError(f"model spec {spec!r}, member {member!r}: {e}") from None
    if resolved.kind != "vision":
      raise ZooError(f"model spec {spec!r}: member {member!r} is a {resolved.kind} model; every "
                     "member of a multi-encoder tower is a vision tower")
    members.append(resolved)
  return MultiResolved(spec=spec.strip(), name=multi_name([m.name for m in members], parsed.grid),
                       members=tuple(members), grid=parsed.grid)
