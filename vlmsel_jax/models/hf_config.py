"""Reading a Hugging Face ``config.json``: the one place every family's ``from_hf`` starts."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping


def read_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
  """A config as a plain dict: ``config`` itself, a ``config.json`` path, or its directory."""
  if isinstance(config, Mapping):
    return dict(config)
  path = os.fspath(config)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  with open(path, encoding="utf-8") as f:
    return json.load(f)
