"""Data sources named by one string, as binaries take them in flags.

``open_source(spec, kind=..., split=...)`` with ``spec`` one of:

=====================================================  ==================================  =====
spec                                                   source                              kinds
=====================================================  ==================================  =====
``easy-vqa``                                           bundled easy-VQA (``split``)        vqa, paired
``photos`` / ``photos:skimage`` / ``photos:sklearn``   bundled sample photos               paired
``folder:/data/dir``                                   image folder + ``captions.jsonl``   paired
``llava:/file.json@/image/root``                       LLaVA JSON / JSONL                  conversation, paired
``coco:/captions.json@/image/root``                    COCO captions                       paired
``vqa:/questions.json,/annotations.json@/image/root``  VQA v2 pair (annotations optional)  vqa
``tfds:name@/data_dir`` (``@/data_dir`` optional)      prepared TFDS, ArrayRecord          paired, vqa, conversation
=====================================================  ==================================  =====

Options follow a ``#``: ``coco:...#captions=first`` (one record per image), ``tfds:...#image=img,
caption=text`` (feature names for record keys). ``split`` picks the split of ``easy-vqa`` and
``tfds``; the file-based specs name their split by their paths. Every problem is one
`DataError` line.
"""

from __future__ import annotations

from vlmsel_jax.data import coco
from vlmsel_jax.data import easy_vqa
from vlmsel_jax.data import llava
from vlmsel_jax.data import paired
from vlmsel_jax.data import photos
from vlmsel_jax.data import records
from vlmsel_jax.data import tfds_source
from vlmsel_jax.data import vqa
from vlmsel_jax.data.records import DataError

PREFIXES = ("easy-vqa", "photos", "folder", "llava", "coco", "vqa", "tfds")
_KINDS = {"easy-vqa": easy_vqa.KINDS, "photos": ("paired",), "folder": ("paired",),
          "llava": llava.KINDS, "coco": ("paired",), "vqa": ("vqa",), "tfds": tfds_source.KINDS}
_OPTIONS = {"coco": ("captions",), "tfds": tuple(tfds_source.DEFAULT_FIELDS)}


def _split_options(spec: str, body: str, prefix: str) -> tuple[str, dict[str, str]]:
  if "#" not in body:
    return body, {}
  body, _, text = body.rpartition("#")
  options = {}
  for item in filter(None, text.split(",")):
    key, eq, value = item.partition("=")
    if not eq or not key or not value:
      raise DataError(f"data spec {spec!r}: options are key=value pairs after '#', got {item!r}")
    if key not in _OPTIONS.get(prefix, ()):
      known = ", ".join(_OPTIONS.get(prefix, ())) or "none"
      raise DataError(f"data spec {spec!r}: unknown option {key!r} for {prefix} (known: {known})")
    options[key] = value
  return body, options


def _path_at_root(spec: str, body: str, prefix: str) -> tuple[str, str]:
  path, at, root = body.rpartition("@")
  if not at or not path or not root:
    raise DataError(f"data spec {spec!r}: expected {prefix}:<annotation file>@<image root>")
  return path, root


def open_source(spec: str, *, kind: str, split: str = "train",
                skip_bad_records: bool = False) -> records.RecordSource:
  """The record source ``spec`` names, giving records of ``kind`` (see the module docstring).

  Raises:
    DataError: an unknown prefix, a kind the source does not have, a malformed spec, or any
      problem the source finds in its data.
  """
  prefix, colon, body = spec.partition(":")
  if prefix not in PREFIXES:
    raise DataError(f"data spec {spec!r}: unknown source {prefix!r} (known: "
                    f"{', '.join(PREFIXES)})")
  if kind not in _KINDS[prefix]:
    raise DataError(f"data spec {spec!r}: {prefix} gives {', '.join(_KINDS[prefix])} records, "
                    f"not {kind!r}")
  body, options = _split_options(spec, body, prefix)
  if prefix == "easy-vqa" and colon:
    raise DataError(f"data spec {spec!r}: easy-vqa takes no argument (use split=...)")
  if prefix == "easy-vqa":
    return easy_vqa.load(split, kind, skip_bad_records=skip_bad_records)
  if prefix == "photos":
    if not body:
      return photos.load()
    if body not in photos.COLLECTIONS:
      raise DataError(f"data spec {spec!r}: photos collections are "
                      f"{', '.join(photos.COLLECTIONS)}")
    return photos.load((body,))
  if not body:
    raise DataError(f"data spec {spec!r}: {prefix} needs a path after '{prefix}:'")
  if prefix == "folder":
    return paired.PairedSource(body, skip_bad_records=skip_bad_records)
  if prefix == "tfds":
    name, at, data_dir = body.partition("@")
    if not name or (at and not data_dir):
      raise DataError(f"data spec {spec!r}: expected tfds:<name>[@<data_dir>]")
    fields = dict(options)
    return tfds_source.TfdsSource(name, data_dir or None, split=split, kind=kind, fields=fields,
                                  skip_bad_records=skip_bad_records)
  path, root = _path_at_root(spec, body, prefix)
  if prefix == "llava":
    return llava.LlavaSource(path, root, kind=kind, skip_bad_records=skip_bad_records)
  if prefix == "coco":
    return coco.CocoCaptionsSource(path, root, captions=options.get("captions", "all"),
                                   skip_bad_records=skip_bad_records)
  questions, comma, annotations = path.partition(",")
  if not questions or (comma and not annotations):
    raise DataError(f"data spec {spec!r}: expected vqa:<questions.json>[,<annotations.json>]"
                    "@<image root>")
  return vqa.VqaSource(questions, annotations or None, root, skip_bad_records=skip_bad_records)


PAIRED_DATASET_PREFIXES = ("easy-vqa", "folder")


def open_paired_dataset(spec: str, *, split: str = "train") -> paired.PairedDataset:
  """The image–caption dataset feature extraction reads, named by a data spec.

  ``folder:/dir`` (an image folder with ``captions.jsonl``) or ``easy-vqa`` (its images, with
  captions derived from their questions; ``split`` picks the split).

  Raises:
    DataError: another source (extraction needs image files it can fingerprint), or any problem
      of the data.
  """
  prefix, _, body = spec.partition(":")
  if prefix not in PAIRED_DATASET_PREFIXES:
    raise DataError(f"data spec {spec!r}: feature extraction reads "
                    f"{', '.join(PAIRED_DATASET_PREFIXES)} sources; write other data as an image "
                    "folder with captions.jsonl and use folder:<dir>")
  if prefix == "folder":
    if not body:
      raise DataError(f"data spec {spec!r}: folder needs a path after 'folder:'")
    return paired.load_paired(body)
  if body:
    raise DataError(f"data spec {spec!r}: easy-vqa takes no argument (use split=...)")
  return easy_vqa.load(split, "paired").paired_dataset()
