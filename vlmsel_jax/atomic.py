"""Atomic file writes: a reader (or a killed run) never sees a half-written result file."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence


def write_atomic(path: str, write: Callable[[str], None]) -> None:
  """Calls ``write(tmp_path)`` for a temporary file beside ``path``, then renames it over ``path``.

  The temporary name keeps ``path``'s extension, so writers that pick a format by extension
  (matplotlib's ``savefig``) write the right one. On any error the temporary file is removed
  and ``path`` is left as it was.
  """
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.tmp-",
                             suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def write_text_atomic(path: str, text: str) -> None:
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  write_atomic(path, write)


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """``rows`` as CSV text with a header of ``columns`` (keys a row lacks are left empty)."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: row.get(k) for k in columns})
  return buf.getvalue()
