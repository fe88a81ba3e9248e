"""Prepared TFDS datasets (ArrayRecord files) as record sources, read without TensorFlow.

`TfdsSource` opens ``tfds.data_source(name, split=..., data_dir=...)``: random access into the
dataset's ``.array_record`` shards, each example decoded by the dataset's own feature spec in
NumPy (images via PIL). The dataset must have been prepared with ``file_format="array_record"``.
Feature names map onto record keys through ``fields`` (defaults below: ``image``, ``caption``,
``question``, ``answers``, ``answer``, ``conversations`` and, when present, ``id``; without an id
feature the id is the example's index).

`write_dataset` prepares such a dataset from records with TFDS's own builder machinery
(``GeneratorBasedBuilder.download_and_prepare``), also without TensorFlow: TFDS needs TF only to
*encode* NumPy images, so images are handed over already PNG-encoded (lossless); the rest of the
path (example serialization, ArrayRecord writing, ``dataset_info.json``, ``features.json``) is
TF-free. Tests use it to write tiny fixtures.
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from vlmsel_jax.data import records
from vlmsel_jax.data.records import DataError
from vlmsel_jax.data import vqa

KINDS = ("paired", "vqa", "conversation")
DEFAULT_FIELDS = {"id": "id", "image": "image", "caption": "caption", "question": "question",
                  "answers": "answers", "answer": "answer", "conversations": "conversations"}
# The record keys each kind reads from the dataset (besides the optional id).
_NEEDS = {"paired": ("image", "caption"), "vqa": ("image", "question", "answers"),
          "conversation": ("image", "conversations")}


def _text(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


class TfdsSource:
  """A split of a prepared TFDS dataset as paired, vqa or conversation records.

  Records come in the dataset's stored order. Without ``skip_bad_records`` nothing is read at
  construction (the features are checked; a record with empty text raises `DataError` when it is
  read); with it every example is read once (images undecoded, then PIL-verified) and the ones
  with empty text or undecodable images are left out and counted.
  """

  def __init__(self, name: str, data_dir: str | None = None, *, split: str = "train",
               kind: str = "paired", fields: Mapping[str, str] | None = None,
               skip_bad_records: bool = False):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if kind not in KINDS:
      raise DataError(f"tfds:{name}: kinds are {', '.join(KINDS)}, not {kind!r}")
    unknown = set(fields or {}) - set(DEFAULT_FIELDS)
    if unknown:
      raise DataError(f"tfds:{name}: unknown record keys in fields: {sorted(unknown)} (known: "
                      f"{', '.join(DEFAULT_FIELDS)})")
    self.fields = {**DEFAULT_FIELDS, **(fields or {})}
    self.kind = kind
    self.name = f"{name}-{split}"
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except  # TFDS raises many kinds; one line.
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DataError(f"tfds:{name} (data_dir {data_dir}, split {split!r}): cannot open as an "
                      f"ArrayRecord data source: {first}") from None
    self.where = str(self._source.dataset_info.data_dir)
    features = self._source.dataset_info.features
    missing = [f"{self.fields[k]!r} (for {k})" for k in _NEEDS[kind]
               if self.fields[k] not in features]
    if missing:
      raise DataError(f"{self.where}: split {split!r} has no feature {', '.join(missing)}; it "
                      f"has {', '.join(sorted(features.keys()))} (map them with fields=...)")
    self._has_id = self.fields["id"] in features
    self._has_answer = self.fields["answer"] in features
    problems = records.Problems(skip_bad_records)
    self._indices = np.arange(len(self._source), dtype=np.int64)
    if skip_bad_records:
      raw = tfds.data_source(name, split=split, data_dir=data_dir, decoders={
          self.fields["image"]: tfds.decode.SkipDecoding()})
      keep = []
      for i in range(len(raw)):
        example = raw[i]
        problem = self._text_problem(example) or _bytes_problem(example[self.fields["image"]])
        if problem is None:
          keep.append(i)
        else:
          problems.report(problem.split(" (")[0], f"{self.where}: {split} example {i}"
                          f"{self._id_note(example)}: {problem}")
      self._indices = np.asarray(keep, np.int64)
    records.require_records(len(self._indices), self.where, problems)
    self._bad = problems.bad

  def _id_note(self, example: Mapping[str, Any]) -> str:
    return f" (id {_text(example[self.fields['id']])!r})" if self._has_id else ""

  def _text_problem(self, example: Mapping[str, Any]) -> str | None:
    """What is wrong with the example's text features, or None."""
    if self.kind == "paired":
      if not _text(example[self.fields["caption"]]).strip():
        return "empty caption"
    elif self.kind == "vqa":
      if not _text(example[self.fields["question"]]).strip():
        return "empty question"
      answers = [_text(a) for a in example[self.fields["answers"]]]
      if not answers or not all(a.strip() for a in answers):
        return "empty answer"
    else:
      turns = example[self.fields["conversations"]]
      if not turns.get("content") or not all(_text(c).strip() for c in turns["content"]):
        return "empty text"
      if not all(_text(r) in ("user", "assistant") for r in turns.get("role", [])):
        return "unknown role (roles must be user or assistant)"
    return None

  @property
  def bad_records(self) -> records.BadRecords:
    return self._bad

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    position = int(self._indices[index])
    example = self._source[position]
    problem = self._text_problem(example)
    rid = _text(example[self.fields["id"]]) if self._has_id else str(position)
    if problem is not None:
      raise DataError(f"{self.where}: example {position} (id {rid!r}): {problem}")
    image = records.to_rgb(example[self.fields["image"]])
    if self.kind == "paired":
      return {"id": rid, "image": image, "caption": _text(example[self.fields["caption"]])}
    if self.kind == "vqa":
      answers = [_text(a) for a in example[self.fields["answers"]]]
      answer = (vqa.normalize_answer(_text(example[self.fields["answer"]])) if self._has_answer
                else vqa.majority_answer(answers))
      return {"id": rid, "image": image, "question": _text(example[self.fields["question"]]),
              "answers": answers, "answer": answer}
    turns = example[self.fields["conversations"]]
    return {"id": rid, "image": image, "conversations": [
        {"role": _text(r), "content": _text(c)} for r, c in zip(turns["role"], turns["content"])]}


def _bytes_problem(data: bytes) -> str | None:
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
    return None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return f"undecodable image ({type(e).__name__}: {e})"


def png_bytes(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(records.to_rgb(image)).save(buffer, format="PNG")
  return buffer.getvalue()


def features_for(kind: str):
  """The TFDS feature spec `write_dataset` uses for records of ``kind``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  text = tfds.features.Text
  spec = {"id": text(), "image": tfds.features.Image(shape=(None, None, 3))}
  if kind == "paired":
    spec["caption"] = text()
  elif kind == "vqa":
    spec.update(question=text(), answers=tfds.features.Sequence(text()), answer=text())
  elif kind == "conversation":
    spec["conversations"] = tfds.features.Sequence({"role": text(), "content": text()})
  else:
    raise DataError(f"write_dataset: kinds are {', '.join(KINDS)}, not {kind!r}")
  return tfds.features.FeaturesDict(spec)


def _example(record: Mapping[str, Any], kind: str) -> dict[str, Any]:
  out = {"id": str(record["id"]), "image": png_bytes(record["image"])}
  if kind == "paired":
    out["caption"] = record["caption"]
  elif kind == "vqa":
    out.update(question=record["question"], answers=list(record["answers"]),
               answer=record["answer"])
  else:
    out["conversations"] = [dict(t) for t in record["conversations"]]
  return out


def write_dataset(name: str, data_dir: str, splits: Mapping[str, Iterable[Mapping[str, Any]]],
                  *, kind: str = "paired", version: str = "1.0.0") -> str:
  """Prepares records of ``kind`` as TFDS dataset ``name`` (ArrayRecord) under ``data_dir``.

  Args:
    name: The dataset name (snake_case), as `TfdsSource` and ``tfds.data_source`` take it.
    data_dir: The TFDS data directory.
    splits: Split name → records (each with the keys of ``kind``; ``id`` unique per split).
    kind: "paired", "vqa" or "conversation".
    version: The dataset version.

  Returns:
    The prepared dataset's directory (``<data_dir>/<name>/<version>``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  features = features_for(kind)

  def generate(self, split_records):  # pylint: disable=unused-argument
    for record in split_records:
      yield str(record["id"]), _example(record, kind)

  namespace = {
      "VERSION": tfds.core.Version(version),
      "RELEASE_NOTES": {version: "Written by vlmsel_jax.data.tfds_source.write_dataset."},
      "name": name,
      "_info": lambda self: tfds.core.DatasetInfo(builder=self, features=features),
      "_split_generators": lambda self, dl_manager: {
          split: self._generate_examples(rows) for split, rows in splits.items()},  # pylint: disable=protected-access
      "_generate_examples": generate,
  }
  # Not registered: the dataset is found again by name in data_dir, from its dataset_info.json.
  builder_class = type(f"Written_{name}", (tfds.core.GeneratorBasedBuilder,), namespace,
                       skip_registration=True)
  builder = builder_class(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)
