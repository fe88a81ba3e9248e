"""The package's layout: binaries at the top level and nowhere else, each one thin, none importing
another; library code in named subpackages.

A binary is a module that runs as a program (``if __name__ == "__main__":``). select's per-method modules
(``vlmsel_jax/selection/*_cli.py``) read flags and report for select, so they are held to a
binary's size too.
"""

from __future__ import annotations

import re
from pathlib import Path

from test_import_graph import PACKAGE, ROOT, import_graph

MAX_BINARY_LINES = 200
_IS_PROGRAM = re.compile(r"^if __name__ == .__main__.:", re.MULTILINE)


def _binaries() -> dict[str, Path]:
  found = {}
  for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    if _IS_PROGRAM.search(path.read_text(encoding="utf-8")):
      found[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
  return found


def test_binaries_are_found():
  binaries = _binaries()
  assert {"vlmsel_jax.score", "vlmsel_jax.train", "vlmsel_jax.select"} <= set(binaries)


def test_the_top_level_holds_only_binaries():
  binaries = _binaries()
  top = sorted(p.stem for p in (ROOT / PACKAGE).glob("*.py") if p.name != "__init__.py")
  library = [name for name in top if f"{PACKAGE}.{name}" not in binaries]
  assert not library, f"library modules at the top level of {PACKAGE}/: {library}"
  nested = [name for name in binaries if name.count(".") > 1]
  assert not nested, f"binaries inside subpackages: {nested}"


def test_binaries_are_thin():
  thin = dict(_binaries())
  thin.update({f"{PACKAGE}.selection.{p.stem}": p
               for p in (ROOT / PACKAGE / "selection").glob("*_cli.py")})
  assert len(thin) > len(_binaries())
  fat = {name: n for name, path in thin.items()
         if (n := len(path.read_text(encoding="utf-8").splitlines())) >= MAX_BINARY_LINES}
  assert not fat, f"binaries of {MAX_BINARY_LINES} lines or more: {fat}"


def test_no_binary_imports_another():
  binaries = set(_binaries())
  graph = import_graph()
  found = [f"{a} imports {b} ({where})" for a in sorted(binaries)
           for b, where in graph[a].items() if b in binaries]
  assert not found, found
  # Nor does the library import a binary.
  found = [f"{a} imports {b} ({where})" for a in sorted(set(graph) - binaries)
           for b, where in graph[a].items() if b in binaries]
  assert not found, found
