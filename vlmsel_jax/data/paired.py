"""A paired image–caption dataset: an image folder and a ``captions.jsonl`` that pairs them.

Each line of the captions file is one JSON object::

  {"id": 17, "image": "relative/path.jpg", "caption": "A dog on a beach."}

``id`` (an integer or a string) names the sample in every feature bank, so the vision and text
banks of one dataset pair row by row; ``image`` is relative to the image folder. Loading checks
every line and that every image file exists; decoding happens when an image is read.

`load_paired` gives the `PairedDataset` that feature extraction uses; `PairedSource` is the same
data as a record source (see `records`) for training pipelines, with ``skip_bad_records``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from vlmsel_jax.data import records
from vlmsel_jax.data.records import DataError  # Re-exported: `paired.DataError` is public API.

CAPTIONS_FILE = "captions.jsonl"


@dataclasses.dataclass(frozen=True)
class Sample:
  id: int | str
  image: str  # Relative to the dataset's image folder.
  caption: str
  line: int  # Line of the captions file.


@dataclasses.dataclass(frozen=True)
class PairedDataset:
  """Samples in captions-file order.

  Attributes:
    root: The image folder.
    captions_path: The captions file.
    samples: The samples.
  """

  root: str
  captions_path: str
  samples: tuple[Sample, ...]

  def __len__(self) -> int:
    return len(self.samples)

  @property
  def ids(self) -> np.ndarray:
    """The sample ids: integers when every id is one, else strings."""
    ids = [s.id for s in self.samples]
    if all(isinstance(i, int) for i in ids):
      return np.asarray(ids, np.int64)
    return np.asarray([str(i) for i in ids])

  @property
  def captions(self) -> list[str]:
    return [s.caption for s in self.samples]

  def image_path(self, index: int) -> str:
    return os.path.join(self.root, self.samples[index].image)

  def load_image(self, index: int) -> Image.Image:
    """The decoded image of sample ``index``, as RGB.

    Raises:
      DataError: naming the file when it cannot be decoded.
    """
    path = self.image_path(index)
    try:
      with Image.open(path) as image:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise DataError(f"{path}: cannot decode image of sample {self.samples[index].id!r} "
                      f"({type(e).__name__}: {e})") from None

  def subset(self, indices: Sequence[int]) -> PairedDataset:
    return dataclasses.replace(self, samples=tuple(self.samples[i] for i in indices))

  def sample(self, max_samples: int | None, seed: int) -> PairedDataset:
    """At most ``max_samples`` samples drawn with ``seed``, kept in file order (None: all)."""
    if not max_samples or max_samples >= len(self):
      return self
    chosen = np.random.default_rng(seed).choice(len(self), size=max_samples, replace=False)
    return self.subset(sorted(chosen.tolist()))

  def without_undecodable(self) -> tuple[PairedDataset, list[str]]:
    """Drops the samples whose image does not decode; returns (dataset, their error messages)."""
    keep, bad = [], []
    for i in range(len(self)):
      try:
        self.load_image(i)
        keep.append(i)
      except DataError as e:
        bad.append(str(e))
    return self.subset(keep), bad

  def fingerprint(self) -> str:
    """A hash of the captions file and, per sample, its pairing and image file size + mtime.

    Cheap (no image is read) and changes whenever a caption, a pairing, the sample selection or
    an image file changes.
    """
    h = hashlib.sha256()
    with open(self.captions_path, "rb") as f:
      h.update(hashlib.sha256(f.read()).digest())
    for s in self.samples:
      st = os.stat(os.path.join(self.root, s.image))
      h.update(json.dumps([s.id, s.image, s.caption, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def load_paired(data_dir: str, captions: str | None = None) -> PairedDataset:
  """Reads ``captions`` (default ``<data_dir>/captions.jsonl``) over the images in ``data_dir``.

  Raises:
    DataError: a missing folder or file, a malformed line (``file:line: ...``), a duplicate id,
      images that do not exist (the count and the first few), or no samples at all.
  """
  samples = _read_samples(data_dir, captions, records.Problems(skip=False))
  captions = captions or os.path.join(data_dir, CAPTIONS_FILE)
  absent = [s for s in samples if not os.path.isfile(os.path.join(data_dir, s.image))]
  if absent:
    first = ", ".join(f"{s.image} (line {s.line})" for s in absent[:3])
    raise DataError(f"{captions}: {len(absent)} of {len(samples)} images not found in "
                    f"{data_dir}: {first}{' ...' if len(absent) > 3 else ''}")
  return PairedDataset(root=data_dir, captions_path=captions, samples=tuple(samples))


def _read_samples(data_dir: str, captions: str | None,
                  problems: records.Problems) -> list[Sample]:
  """Parses the captions file; each bad line goes to ``problems`` (raise or count)."""
  if not data_dir or not os.path.isdir(data_dir):
    raise DataError(f"{data_dir}: image folder not found")
  captions = captions or os.path.join(data_dir, CAPTIONS_FILE)
  if not os.path.isfile(captions):
    raise DataError(f"{captions}: captions file not found")
  samples, seen = [], {}
  with open(captions, encoding="utf-8") as f:
    for number, text in enumerate(f, start=1):
      if not text.strip():
        continue
      where = f"{captions}:{number}"
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        problems.report("malformed JSON", f"{where}: not valid JSON ({e.msg})")
        continue
      if not isinstance(row, dict):
        problems.report("malformed record", f"{where}: expected a JSON object with id, image, "
                        "caption")
        continue
      missing = [k for k in ("id", "image", "caption") if k not in row]
      if missing:
        problems.report("malformed record", f"{where}: missing {', '.join(missing)}")
        continue
      sid, image, caption = row["id"], row["image"], row["caption"]
      if isinstance(sid, bool) or not isinstance(sid, (int, str)) or sid == "":
        problems.report("malformed record", f"{where}: id must be an integer or a non-empty "
                        f"string, got {sid!r}")
        continue
      if not isinstance(image, str) or not image or os.path.isabs(image):
        problems.report("malformed record", f"{where}: image must be a path relative to "
                        f"{data_dir}, got {image!r}")
        continue
      if not isinstance(caption, str) or not caption.strip():
        problems.report("empty caption", f"{where}: caption must be a non-empty string, got "
                        f"{caption!r}")
        continue
      if sid in seen:
        problems.report("duplicate id", f"{where}: id {sid!r} already used on line {seen[sid]}")
        continue
      seen[sid] = number
      samples.append(Sample(id=sid, image=image, caption=caption, line=number))
  if not samples:
    extra = f" ({problems.bad})" if problems.bad else ""
    raise DataError(f"{captions}: no samples (the captions file is empty){extra}")
  if len({type(s.id) for s in samples}) > 1 and len({str(s.id) for s in samples}) < len(samples):
    raise DataError(f"{captions}: ids are unique only as mixed integers and strings "
                    "(e.g. 1 and \"1\"); use one kind")
  return samples


class PairedSource:
  """An image folder + ``captions.jsonl`` as a record source of paired records.

  Records are ``{"id": str, "image": uint8[H, W, 3], "caption": str}`` in captions-file order.
  With ``skip_bad_records`` malformed lines, empty captions, duplicate ids and missing or
  undecodable images (each image is verified at construction) are left out and counted in
  ``bad_records``; without it the first one raises `DataError` naming the line and the file.
  """

  def __init__(self, data_dir: str, captions: str | None = None, *,
               skip_bad_records: bool = False, name: str | None = None):
    problems = records.Problems(skip_bad_records)
    samples = _read_samples(data_dir, captions, problems)
    captions = captions or os.path.join(data_dir, CAPTIONS_FILE)
    keep = records.check_images(
        [os.path.join(data_dir, s.image) for s in samples],
        lambda i: f"line {samples[i].line} (id {samples[i].id!r})", problems, captions)
    samples = [samples[i] for i in keep]
    records.require_records(len(samples), captions, problems)
    self.dataset = PairedDataset(root=data_dir, captions_path=captions, samples=tuple(samples))
    self.name = name or os.path.basename(os.path.normpath(data_dir))
    self._bad = problems.bad

  @property
  def bad_records(self) -> records.BadRecords:
    return self._bad

  def __len__(self) -> int:
    return len(self.dataset)

  def __getitem__(self, index: int) -> dict:
    sample = self.dataset.samples[index]
    image = records.decode_image(
        self.dataset.image_path(index), f"id {sample.id!r} ({self.dataset.captions_path}:"
        f"{sample.line})")
    return {"id": str(sample.id), "image": image, "caption": sample.caption}
