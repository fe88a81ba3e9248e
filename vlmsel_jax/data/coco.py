"""COCO-captions data (``captions_train2017.json`` and the like) as paired records.

The annotation file holds ``{"images": [{"id", "file_name", ...}], "annotations": [{"id",
"image_id", "caption"}, ...]}``; ``file_name`` is relative to the image root. COCO has about five
captions per image: ``captions="all"`` gives one record per caption (id: the annotation id, in
file order), ``captions="first"`` one per image with the caption of its lowest annotation id (id:
the image id, in the order of ``images``), which is what feature scoring wants. Images without
any caption are not records.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vlmsel_jax.data import records
from vlmsel_jax.data.records import DataError

CAPTION_MODES = ("all", "first")


class CocoCaptionsSource(records.EntrySource):
  """A COCO captions JSON file over an image root, as paired records."""

  def __init__(self, json_path: str, image_root: str, *, captions: str = "all",
               skip_bad_records: bool = False, name: str | None = None):
    if captions not in CAPTION_MODES:
      raise DataError(f"{json_path}: captions must be one of {', '.join(CAPTION_MODES)}, "
                      f"got {captions!r}")
    if not os.path.isfile(json_path):
      raise DataError(f"{json_path}: annotation file not found")
    if not os.path.isdir(image_root):
      raise DataError(f"{image_root}: image root not found (for {json_path})")
    self.name = name or os.path.splitext(os.path.basename(json_path))[0]
    self.json_path = json_path
    self.image_root = image_root
    with open(json_path, encoding="utf-8") as f:
      try:
        document = json.load(f)
      except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(document, dict) or not all(
        isinstance(document.get(k), list) for k in ("images", "annotations")):
      raise DataError(f"{json_path}: expected a COCO captions object with lists 'images' and "
                      "'annotations'")
    problems = records.Problems(skip_bad_records)
    files, order = {}, []
    for index, image in enumerate(document["images"]):
      where = f"{json_path}: images[{index}]"
      iid = records.record_id(image.get("id")) if isinstance(image, dict) else None
      name_ = image.get("file_name") if isinstance(image, dict) else None
      if iid is None or not isinstance(name_, str) or not name_ or os.path.isabs(name_):
        problems.report("malformed record", f"{where}: expected an object with id and a relative "
                        f"file_name, got {image!r:.100}")
        continue
      if iid in files:
        problems.report("duplicate id", f"{where}: image id {iid!r} listed twice")
        continue
      files[iid] = name_
      order.append(iid)
    by_image: dict[str, list[tuple[Any, str, str]]] = {}
    entries = []  # (record id, image id, caption, where)
    for index, ann in enumerate(document["annotations"]):
      where = f"{json_path}: annotations[{index}]"
      if not isinstance(ann, dict):
        problems.report("malformed record", f"{where}: expected an object")
        continue
      iid, aid, caption = records.record_id(ann.get("image_id")), ann.get("id"), ann.get("caption")
      aid_text = records.record_id(aid)
      if aid_text is None or iid is None:
        problems.report("malformed record", f"{where}: needs id and image_id, got {ann!r:.100}")
        continue
      where = f"{where} (id {aid_text!r})"
      if iid not in files:
        problems.report("unknown image", f"{where}: image_id {iid!r} is not in images")
        continue
      if not records.nonempty_text(caption):
        problems.report("empty caption", f"{where}: caption must be a non-empty string, got "
                        f"{caption!r}")
        continue
      by_image.setdefault(iid, []).append((aid, aid_text, caption.strip()))
      entries.append((aid_text, iid, caption.strip(), where))
    if captions == "first":
      entries = []
      for iid in order:
        if iid in by_image:
          _, aid_text, caption = min(by_image[iid], key=lambda a: _sort_key(a[0]))
          entries.append((iid, iid, caption, f"{json_path}: image {iid!r}"))
    paths = [os.path.join(image_root, files[e[1]]) for e in entries]
    # Check each image file once, however many captions it has.
    unique = sorted(set(paths))
    found = dict(zip(unique, records.image_problems(unique)))
    kept = []
    for entry, path in zip(entries, paths):
      if found[path] is None:
        kept.append(entry)
      else:
        problems.report(records.reason_of(found[path]), f"{entry[3]}: {found[path]}: {path}")
    self._entries = [(rid, files[iid], caption) for rid, iid, caption, _ in kept]
    records.require_records(len(self._entries), json_path, problems)
    self._bad = problems.bad

  def __getitem__(self, index: int) -> dict[str, Any]:
    rid, file_name, caption = self._entries[index]
    image = records.decode_image(os.path.join(self.image_root, file_name),
                                 f"id {rid!r} ({self.json_path})")
    return {"id": rid, "image": image, "caption": caption}


def _sort_key(value: Any) -> tuple[int, Any]:
  # Annotation ids are integers in COCO, but compare strings too without a TypeError.
  return (0, value, "") if isinstance(value, int) else (1, 0, str(value))
