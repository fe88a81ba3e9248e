"""easy-VQA: a small real VQA dataset bundled in the ``easy-vqa`` pip package, no download.

The package holds ``data/{train,test}/questions.json`` (a list of ``[question, answer,
image_id]``), ``data/{train,test}/images/<image_id>.png`` (64×64, one coloured shape on a light
background; 4,000 train and 1,000 test images, 38,575 and 9,673 questions) and
``data/answers.txt`` (the 13 possible answers).

``load(split, kind="vqa")`` gives one vqa record per question; ``kind="paired"`` one paired record
per image, captioned "A <colour> <shape>." (e.g. "A blue rectangle."). The colour and shape come
from the image's own questions: direct answers ("what is the blue shape?" → rectangle, "what
color is the shape?" → blue) and yes/no answers ("is there not a red shape?" → no means red),
including elimination (two shapes ruled out leave the third). About 10% of images have
questions that leave the colour or the shape open; for those the image's pixels decide: the shape
is filled with one exact palette colour, and its area over its bounding box separates rectangles
(≈ 1), circles (≈ π/4) and triangles (≈ 1/2). `tests/data/test_data_sources.py` checks that the pixels
agree with the questions on every image whose questions do decide. An image that neither decides
is a bad record (error, or skipped and counted).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import os
import re
from typing import Any

import numpy as np

from vlmsel_jax.data import paired
from vlmsel_jax.data import records
from vlmsel_jax.data import vqa
from vlmsel_jax.data.records import DataError

SPLITS = ("train", "test")
KINDS = ("vqa", "paired")
SHAPES = ("circle", "rectangle", "triangle")
# The generator's palette: the shape is drawn in exactly one of these RGB values.
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
          "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42),
          "yellow": (255, 255, 0)}
# Shape area / bounding-box area: rectangles ≥ 0.96, circles 0.75–0.91, triangles 0.50–0.63 on
# the whole dataset; the cuts sit in the gaps.
_TRIANGLE_BELOW = 0.69
_RECTANGLE_ABOVE = 0.935
# Fewer exact palette pixels than this is no shape at all.
_MIN_SHAPE_PIXELS = 8
_NEGATIONS = re.compile(r"\bnot\b|^is no ")


@functools.lru_cache(maxsize=1)
def data_dir() -> str:
  """The package's ``data`` folder.

  Raises:
    DataError: the ``easy-vqa`` package is not installed.
  """
  spec = importlib.util.find_spec("easy_vqa")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("easy-vqa data needs the easy-vqa package: run `pip install easy-vqa`")
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f"easy-vqa has splits {', '.join(SPLITS)}, not {split!r}")


def questions_path(split: str) -> str:
  _check_split(split)
  return os.path.join(data_dir(), split, "questions.json")


def image_path(split: str, image_id: int) -> str:
  return os.path.join(data_dir(), split, "images", f"{image_id}.png")


@functools.lru_cache(maxsize=2)
def questions(split: str) -> tuple[tuple[str, str, int], ...]:
  """The split's (question, answer, image_id) triples, in file order."""
  path = questions_path(split)
  with open(path, encoding="utf-8") as f:
    rows = json.load(f)
  for index, row in enumerate(rows):
    if (not isinstance(row, list) or len(row) != 3 or not all(
        records.nonempty_text(x) for x in row[:2]) or not isinstance(row[2], int)):
      raise DataError(f"{path}: entry {index}: expected [question, answer, image_id], got "
                      f"{row!r:.100}")
  return tuple((q, a, i) for q, a, i in rows)


def answers() -> list[str]:
  """The answer vocabulary (13 answers), in ``answers.txt`` order."""
  with open(os.path.join(data_dir(), "answers.txt"), encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def majority_answer(split: str = "train") -> str:
  """The most common answer of ``split`` (the constant-prediction baseline)."""
  counts = collections.Counter(a for _, a, _ in questions(split))
  return counts.most_common(1)[0][0]


def attributes_from_questions(rows) -> dict[int, dict[str, str | None]]:
  """image_id → {"shape": ..., "color": ...} as far as its questions decide (None: open).

  Raises:
    DataError: an image whose questions contradict each other.
  """
  vocab = {"shape": set(SHAPES), "color": set(COLORS)}
  present = collections.defaultdict(lambda: {"shape": set(), "color": set()})
  absent = collections.defaultdict(lambda: {"shape": set(), "color": set()})
  for question, answer, image_id in rows:
    present[image_id]  # pylint: disable=pointless-statement  # Every image gets an entry.
    words = question.rstrip("?").split()
    for attr in vocab:
      if answer in vocab[attr]:  # "what shape / what color ..." answered directly.
        present[image_id][attr].add(answer)
    # "what is the <colour> shape?" names the colour; "what color is the <shape>?" the shape.
    if answer in vocab["shape"]:
      present[image_id]["color"].update(w for w in words if w in vocab["color"])
    if answer in vocab["color"]:
      present[image_id]["shape"].update(w for w in words if w in vocab["shape"])
    if answer in ("yes", "no"):
      there = (answer == "yes") != bool(_NEGATIONS.search(question))
      for attr in vocab:
        for w in words:
          if w in vocab[attr]:
            (present if there else absent)[image_id][attr].add(w)
  out = {}
  for image_id, facts in present.items():
    out[image_id] = {}
    for attr in vocab:
      yes, no = facts[attr], absent[image_id][attr]
      if len(yes) > 1 or yes & no:
        raise DataError(f"easy-vqa image {image_id}: its questions contradict each other on "
                        f"the {attr} ({sorted(yes)} present, {sorted(no)} absent)")
      left = vocab[attr] - no
      out[image_id][attr] = next(iter(yes)) if yes else (
          next(iter(left)) if len(left) == 1 else None)
  return out


def attributes_from_pixels(image: np.ndarray) -> dict[str, str | None]:
  """{"shape", "color"} of an easy-VQA image from its pixels (None where they do not decide)."""
  image = np.asarray(image, np.int64)
  # One integer per pixel colour makes the counting 1-D.
  codes = (image[..., 0] << 16) | (image[..., 1] << 8) | image[..., 2]
  palette = np.array(list(COLORS.values()), np.int64)
  palette_codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
  values, freq = np.unique(codes, return_counts=True)
  counts = np.array([freq[values == c].sum() for c in palette_codes])
  best = int(np.argmax(counts))
  if counts[best] < _MIN_SHAPE_PIXELS:
    return {"shape": None, "color": None}
  color = list(COLORS)[best]
  # The background is the most common colour; antialiased edge pixels go to the nearer one.
  code = values[np.argmax(freq)]
  background = np.array([code >> 16, (code >> 8) & 255, code & 255])
  mask = (((image - palette[best]) ** 2).sum(-1) < ((image - background) ** 2).sum(-1))
  rows, cols = np.nonzero(mask)
  fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
  shape = ("triangle" if fill < _TRIANGLE_BELOW else
           "rectangle" if fill > _RECTANGLE_ABOVE else "circle")
  return {"shape": shape, "color": color}


def caption(shape: str, color: str) -> str:
  return f"A {color} {shape}."


class EasyVqaSource(records.EntrySource):
  """easy-VQA as vqa records (one per question) or paired records (one per image)."""

  def __init__(self, split: str = "train", kind: str = "vqa", *,
               skip_bad_records: bool = False):
    _check_split(split)
    if kind not in KINDS:
      raise DataError(f"easy-vqa has kinds {', '.join(KINDS)}, not {kind!r}")
    self.split, self.kind = split, kind
    self.name = f"easy-vqa-{split}-{kind}"
    path = questions_path(split)
    rows = questions(split)
    problems = records.Problems(skip_bad_records)
    if kind == "vqa":
      entries = [(f"{split}/q{i}", image_id, (q, a)) for i, (q, a, image_id) in enumerate(rows)]
    else:
      entries = []
      for image_id, attrs in sorted(attributes_from_questions(rows).items()):
        if attrs["shape"] is None or attrs["color"] is None:
          pixels = attributes_from_pixels(records.decode_image(
              image_path(split, image_id), f"image {image_id} ({path})"))
          attrs = {k: v or pixels[k] for k, v in attrs.items()}
        open_ = [k for k, v in attrs.items() if v is None]
        if open_:
          problems.report("caption undetermined", f"{path}: image {image_id}: neither its "
                          f"questions nor its pixels determine its {' and '.join(open_)}: "
                          f"{image_path(split, image_id)}")
          continue
        entries.append((f"{split}/{image_id}", image_id,
                        caption(attrs["shape"], attrs["color"])))
    keep = records.check_images([image_path(split, e[1]) for e in entries],
                                lambda i: f"record {entries[i][0]!r}", problems, path)
    self._entries = [entries[i] for i in keep]
    records.require_records(len(self._entries), path, problems)
    self._bad = problems.bad

  def paired_dataset(self) -> paired.PairedDataset:
    """The paired records as the image folder + captions dataset feature extraction reads.

    Its fingerprint hashes the split's questions file (which the captions derive from) and each
    image file's size and modification time.
    """
    if self.kind != "paired":
      raise DataError(f"{self.name}: a paired dataset needs kind='paired'")
    root = data_dir()
    samples = tuple(
        paired.Sample(id=rid, image=os.path.relpath(image_path(self.split, image_id), root),
                      caption=text, line=0)
        for rid, image_id, text in self._entries)
    return paired.PairedDataset(root=root, captions_path=questions_path(self.split),
                                samples=samples)

  def answer_of(self, index: int) -> str:
    """The normalized answer of vqa record ``index``, without decoding its image."""
    if self.kind != "vqa":
      raise DataError(f"{self.name}: paired records have no answers")
    return vqa.normalize_answer(self._entries[index][2][1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    rid, image_id, content = self._entries[index]
    image = records.decode_image(image_path(self.split, image_id),
                                 f"record {rid!r} ({questions_path(self.split)})")
    if self.kind == "paired":
      return {"id": rid, "image": image, "caption": content}
    question, answer = content
    return {"id": rid, "image": image, "question": question, "answers": [answer],
            "answer": vqa.normalize_answer(answer)}


def load(split: str = "train", kind: str = "vqa", *,
         skip_bad_records: bool = False) -> EasyVqaSource:
  """easy-VQA ``split`` as a record source of ``kind`` ("vqa" or "paired")."""
  return EasyVqaSource(split, kind, skip_bad_records=skip_bad_records)
