"""What every data source shares: the record-source protocol, errors, and bad-record accounting.

A *record source* is a random-access collection of records (dicts) that `grain` can read:
``len(source)``, ``source[i]``, plus ``source.name`` and ``source.bad_records``. Annotation
problems (malformed JSON, empty captions, missing image files, ...) are found when a source is
constructed: by default the first one raises `DataError` with a one-line message naming the record
and the file; with ``skip_bad_records=True`` the record is left out and counted in the source's
`BadRecords` summary, so nothing is dropped silently. Images are decoded lazily, in
``__getitem__``, to ``np.uint8`` arrays of shape (H, W, 3).

Record kinds (exact keys):

- paired: ``{"id": str, "image": uint8[H, W, 3], "caption": str}``
- conversation: ``{"id": str, "image": uint8[H, W, 3], "conversations": [{"role": "user" |
  "assistant", "content": str}, ...]}``
- vqa: ``{"id": str, "image": uint8[H, W, 3], "question": str, "answers": list[str],
  "answer": str}``
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

KINDS = ("paired", "conversation", "vqa")
# How many bad records a summary keeps by name; the counts cover all of them.
MAX_EXAMPLES = 5
# Threads for the construction-time image check (file I/O bound, so more than the core count).
VERIFY_THREADS = 16

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(ValueError):
  """A malformed or incomplete dataset; the one-line message names the file and the record."""


@runtime_checkable
class RecordSource(Protocol):
  """A random-access source of records that `grain.MapDataset.source` accepts."""

  name: str

  @property
  def bad_records(self) -> BadRecords:
    ...

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


@dataclasses.dataclass
class BadRecords:
  """Records a source left out: counts by reason and the first few, by name.

  Empty (falsy) when nothing was skipped.
  """

  by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list[str] = dataclasses.field(default_factory=list)

  @property
  def skipped(self) -> int:
    return sum(self.by_reason.values())

  def __bool__(self) -> bool:
    return self.skipped > 0

  def add(self, reason: str, message: str) -> None:
    """Counts one skipped record; ``message`` names it and its file."""
    self.by_reason[reason] += 1
    if len(self.examples) < MAX_EXAMPLES:
      self.examples.append(message)

  def as_dict(self) -> dict[str, Any]:
    return {"skipped": self.skipped, "by_reason": dict(sorted(self.by_reason.items())),
            "examples": list(self.examples)}

  def __str__(self) -> str:
    if not self:
      return "no records skipped"
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.by_reason.items()))
    return f"{self.skipped} records skipped ({reasons}); first: {self.examples[0]}"


class EntrySource:
  """Base of the sources that hold their checked records as ``self._entries`` and their
  skipped-record summary as ``self._bad``; subclasses define ``__getitem__``."""

  _entries: list
  _bad: "BadRecords"

  @property
  def bad_records(self) -> "BadRecords":
    return self._bad

  def __len__(self) -> int:
    return len(self._entries)


class Problems:
  """Raises on the first problem, or (``skip=True``) counts it in ``bad`` and carries on."""

  def __init__(self, skip: bool):
    self.skip = skip
    self.bad = BadRecords()

  def report(self, reason: str, message: str) -> None:
    """``message`` is the one-line error: it names the file and the record."""
    if not self.skip:
      raise DataError(message)
    self.bad.add(reason, message)


def decode_image(path: str, record: str) -> np.ndarray:
  """The image file at ``path`` as ``uint8[H, W, 3]`` (RGB).

  Raises:
    DataError: naming the file and ``record`` when it cannot be read or decoded.
  """
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except _DECODE_ERRORS as e:
    raise DataError(f"{path}: cannot decode image of {record} ({type(e).__name__}: {e})") from None


def image_problem(path: str) -> str | None:
  """Why the image file at ``path`` is unusable (None when it decodes).

  Every pixel is decoded, so a truncated or corrupt body is found here, when the data is opened,
  not when a training batch reads it. A JPEG decodes at its smallest DCT scale (``draft``),
  which still reads the whole bitstream, for a fraction of the cost.
  """
  try:
    with Image.open(path) as image:
      image.draft("RGB", (1, 1))
      image.load()
    return None
  except FileNotFoundError:
    return "image not found"
  except _DECODE_ERRORS as e:
    return f"undecodable image ({type(e).__name__}: {e})"


def image_problems(paths: Sequence[str]) -> list[str | None]:
  """Per path, why its image is unusable, or None (`image_problem`, in a thread pool)."""
  with concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS) as pool:
    return list(pool.map(image_problem, paths))


def reason_of(problem: str) -> str:
  """The summary category of an `image_problem` message."""
  return problem.split(" (")[0]


def check_images(paths: Sequence[str], describe: Callable[[int], str], problems: Problems,
                 where: str) -> list[int]:
  """The positions of ``paths`` whose image files are usable, in order.

  Each file is decoded (`image_problems`), so a missing or undecodable image is reported now,
  when the data is opened, instead of failing mid-training.

  Args:
    paths: Image file paths, one per record.
    describe: Position → the record's name for messages (e.g. ``"line 3 (id 'x')"``).
    problems: Where problems go.
    where: The annotation file the records come from, for messages.
  """
  keep = []
  for i, problem in enumerate(image_problems(paths)):
    if problem is None:
      keep.append(i)
    else:
      problems.report(reason_of(problem), f"{where}: {describe(i)}: {problem}: {paths[i]}")
  return keep


def to_rgb(array: np.ndarray) -> np.ndarray:
  """A gray (H, W), gray-alpha, RGB or RGBA array (uint8 or bool) as ``uint8[H, W, 3]``."""
  array = np.asarray(array)
  if array.dtype == bool:
    array = array.astype(np.uint8) * 255
  if array.dtype != np.uint8:
    raise DataError(f"expected a uint8 image, got {array.dtype}")
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
    raise DataError(f"expected an image of shape (H, W[, C]), got {array.shape}")
  if array.shape[2] in (2, 4):  # Drop alpha.
    array = array[:, :, :-1]
  if array.shape[2] == 1:
    array = np.repeat(array, 3, axis=2)
  return np.ascontiguousarray(array)


def nonempty_text(value: Any) -> bool:
  return isinstance(value, str) and bool(value.strip())


def record_id(value: Any) -> str | None:
  """A JSON id (string or integer, not bool) as a string; None when it is not one."""
  if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
    return None
  return str(value)


def iter_json_records(path: str, problems: Problems,
                      container_key: str | None = None) -> Iterable[tuple[str, Any]]:
  """(location, value) for each record of a JSON array file or a JSON-lines file.

  A ``.jsonl`` file is read line by line (a malformed line is a bad record, location
  ``file:line``); any other file is one JSON document: a list of records, or an object whose
  ``container_key`` holds the list (location ``file[index]``). A file that is not valid JSON as a
  whole is always an error.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: annotation file not found")
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      for number, text in enumerate(f, start=1):
        if not text.strip():
          continue
        try:
          value = json.loads(text)
        except json.JSONDecodeError as e:
          problems.report("malformed JSON", f"{path}:{number}: not valid JSON ({e.msg})")
          continue
        yield f"line {number}", value
    return
  with open(path, encoding="utf-8") as f:
    try:
      document = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if container_key is not None:
    if not isinstance(document, dict) or not isinstance(document.get(container_key), list):
      raise DataError(f"{path}: expected a JSON object with a list under {container_key!r}")
    document = document[container_key]
  if not isinstance(document, list):
    raise DataError(f"{path}: expected a JSON list of records")
  for index, value in enumerate(document):
    yield f"entry {index}", value


def require_records(count: int, where: str, problems: Problems) -> None:
  """Raises when nothing is left: an empty dataset is never what a caller meant."""
  if count == 0:
    extra = f" ({problems.bad})" if problems.bad else ""
    raise DataError(f"{where}: no usable records{extra}")
