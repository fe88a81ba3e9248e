"""LLaVA-format data: instruction conversations and stage-1 pretraining captions.

A LLaVA file is a JSON list (or ``.jsonl``, one object a line) of::

  {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                     {"from": "gpt", "value": "The bus is white and red."}, ...]}

``image`` is relative to the image root. The pretraining file (``blip_laion_cc_sbu_558k.json``)
has the same format with one human turn (an instruction and ``<image>``) and one gpt turn (the
caption).

`LlavaSource` gives conversation records, roles mapped human → user and gpt → assistant, every
turn's text verbatim (``<image>`` included where it appears), or, with ``kind="paired"``, paired
records whose caption is the record's single gpt turn (stage 1 trains on captions). Records
without an image (text-only conversations in the instruction mixes) cannot train a VLM step and
count as bad records ("no image"). Ids are kept as strings and need not be unique (the public
instruction mix repeats some).
"""

from __future__ import annotations

import os
from typing import Any

from vlmsel_jax.data import records
from vlmsel_jax.data.records import DataError

ROLES = {"human": "user", "gpt": "assistant"}
KINDS = ("conversation", "paired")


class LlavaSource(records.EntrySource):
  """A LLaVA JSON / JSONL file over an image root, as conversation or paired records."""

  def __init__(self, json_path: str, image_root: str, *, kind: str = "conversation",
               skip_bad_records: bool = False, name: str | None = None):
    if kind not in KINDS:
      raise DataError(f"{json_path}: LLaVA data has kinds {', '.join(KINDS)}, not {kind!r}")
    if not os.path.isdir(image_root):
      raise DataError(f"{image_root}: image root not found (for {json_path})")
    self.kind = kind
    self.name = name or os.path.splitext(os.path.basename(json_path))[0]
    self.json_path = json_path
    self.image_root = image_root
    problems = records.Problems(skip_bad_records)
    entries = []
    for where, value in records.iter_json_records(json_path, problems):
      entry = self._parse(value, f"{json_path}: {where}", problems)
      if entry is not None:
        entries.append((where,) + entry)
    keep = records.check_images(
        [os.path.join(image_root, e[2]) for e in entries],
        lambda i: f"{entries[i][0]} (id {entries[i][1]!r})", problems, json_path)
    self._entries = [entries[i] for i in keep]
    records.require_records(len(self._entries), json_path, problems)
    self._bad = problems.bad

  def _parse(self, value: Any, where: str,
             problems: records.Problems) -> tuple[str, str, Any] | None:
    """(id, image path, conversations or caption), or None after reporting a problem."""
    if not isinstance(value, dict):
      problems.report("malformed record", f"{where}: expected a JSON object with id, image, "
                      "conversations")
      return None
    rid = records.record_id(value.get("id"))
    if rid is None:
      problems.report("malformed record", f"{where}: id must be an integer or a non-empty "
                      f"string, got {value.get('id')!r}")
      return None
    where = f"{where} (id {rid!r})"
    image = value.get("image")
    if image is None:
      problems.report("no image", f"{where}: no image (a text-only conversation); pass "
                      "skip_bad_records=True to leave such records out")
      return None
    if not isinstance(image, str) or not image or os.path.isabs(image):
      problems.report("malformed record", f"{where}: image must be a path relative to "
                      f"{self.image_root}, got {image!r}")
      return None
    turns = value.get("conversations")
    if not isinstance(turns, list) or not turns:
      problems.report("malformed record", f"{where}: conversations must be a non-empty list")
      return None
    conversation = []
    for t, turn in enumerate(turns):
      if not isinstance(turn, dict) or turn.get("from") not in ROLES:
        problems.report("malformed record", f"{where}: turn {t} must be an object with from "
                        f"'human' or 'gpt', got {turn!r:.80}")
        return None
      if not records.nonempty_text(turn.get("value")):
        problems.report("empty text", f"{where}: turn {t} has no text")
        return None
      conversation.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if self.kind == "conversation":
      return rid, image, conversation
    answers = [turn["content"] for turn in conversation if turn["role"] == "assistant"]
    if len(answers) != 1:
      problems.report("not a caption record", f"{where}: the paired view needs exactly one gpt "
                      f"turn (the caption), found {len(answers)}")
      return None
    return rid, image, answers[0].strip()

  def answer_of(self, index: int) -> str:
    """The last assistant turn of conversation ``index``, without decoding its image."""
    where, rid, _, content = self._entries[index]
    if self.kind == "paired":
      return content  # The caption is the conversation's single assistant turn.
    turns = [t["content"] for t in content if t["role"] == "assistant"]
    if not turns:
      raise DataError(f"id {rid!r} ({self.json_path}: {where}): no assistant turn")
    return turns[-1]

  def __getitem__(self, index: int) -> dict[str, Any]:
    where, rid, image, content = self._entries[index]
    array = records.decode_image(os.path.join(self.image_root, image),
                                 f"id {rid!r} ({self.json_path}: {where})")
    if self.kind == "paired":
      return {"id": rid, "image": array, "caption": content}
    return {"id": rid, "image": array,
            "conversations": [dict(turn) for turn in content]}
