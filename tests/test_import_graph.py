"""The package's import graph has no cycles, and the light modules stay light.

The graph is read from the source, never by importing it: every ``import x`` and ``from x import
y`` (relative ones too) in every ``.py`` file of ``vlmsel_jax``, wherever it stands. An import
inside a function is an arrow like any other: it only moves the moment the cycle closes.

An arrow points at the module an import reads: ``from a.b import c`` names the module ``a.b.c``
when there is one, else ``a.b``. A package's ``__init__`` runs before its modules do, but that is
not counted as their import of it, or every package whose ``__init__`` hands on its modules'
names would form a cycle with each of them.
"""

from __future__ import annotations

import ast
import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = "vlmsel_jax"
ROOT = Path(__file__).resolve().parent.parent


def _modules(root: Path = ROOT) -> dict[str, Path]:
  """Dotted module name → its file, for every ``.py`` file of the package."""
  modules = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The module a ``from ... import`` reads from, a relative one made absolute."""
  if not node.level:
    return node.module
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = ROOT) -> dict[str, dict[str, str]]:
  """module → {module it imports: "file:line" of its first import of it}, within the package."""
  modules = _modules(root)
  lines: dict[str, dict[str, int]] = {m: {} for m in modules}
  for module, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        parent = _absolute(node, module, path.name == "__init__.py")
        names = [f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in modules else parent
                 for alias in node.names]
      else:
        continue
      for name in names:
        if name.split(".")[0] != PACKAGE:
          continue
        while name not in modules:  # ``import a.b.gone`` still runs ``a.b``.
          name = name.rpartition(".")[0]
        if name != module:
          lines[module][name] = min(lines[module].get(name, node.lineno), node.lineno)
  return {module: {target: f"{modules[module].relative_to(root)}:{line}"
                   for target, line in sorted(targets.items())}
          for module, targets in lines.items()}


def knots(graph: dict[str, dict[str, str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm), sorted:
  each is a set of modules that import one another, through one cycle or several."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)

  for start in sorted(graph):
    if start in index:
      continue
    visit(start)
    work = [(start, iter(graph[start]))]
    while work:
      node, targets = work[-1]
      for target in targets:
        if target not in index:
          visit(target)
          work.append((target, iter(graph[target])))
          break
        if target in on_stack:
          low[node] = min(low[node], index[target])
      else:  # Every target of ``node`` is done.
        work.pop()
        if work:
          parent = work[-1][0]
          low[parent] = min(low[parent], low[node])
        if low[node] == index[node]:
          component = [stack.pop()]
          while component[-1] != node:
            component.append(stack.pop())
          on_stack.difference_update(component)
          if len(component) > 1:
            found.append(sorted(component))
  return sorted(found)


def way_round(graph: dict[str, dict[str, str]], knot: list[str]) -> list[str]:
  """The shortest cycle from the knot's first module back to it (that module at both ends)."""
  members, first = set(knot), knot[0]
  paths = {first: [first]}
  queue = collections.deque([first])
  while queue:
    node = queue.popleft()
    if first in graph[node]:
      return paths[node] + [first]
    for target in graph[node]:
      if target in members and target not in paths:
        paths[target] = paths[node] + [target]
        queue.append(target)
  raise ValueError(f"{knot} is not a knot of the graph")


def describe(graph: dict[str, dict[str, str]], knot: list[str]) -> str:
  """The knot's modules, and one cycle through them with the import behind each arrow."""
  cycle = way_round(graph, knot)
  steps = "\n".join(f"    {a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))
  return f"  {len(knot)} modules import one another: {', '.join(knot)}; for one:\n{steps}"


def test_knots_are_found_with_the_imports_that_tie_them():
  graph = {"p.a": {"p.b": "p/a.py:3"}, "p.b": {"p.c": "p/b.py:4", "p.d": "p/b.py:5"},
           "p.c": {"p.a": "p/c.py:9"}, "p.d": {"p.b": "p/d.py:1"}, "p.e": {"p.a": "p/e.py:2"}}
  assert knots(graph) == [["p.a", "p.b", "p.c", "p.d"]]
  assert way_round(graph, knots(graph)[0]) == ["p.a", "p.b", "p.c", "p.a"]
  assert "    p.c -> p.a (p/c.py:9)" in describe(graph, knots(graph)[0]).splitlines()
  assert not knots({"p.a": {"p.b": "p/a.py:1"}, "p.b": {}})


def test_graph_counts_imports_inside_functions_and_relative_ones(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from .low import thing\n")
  (pkg / "sub" / "low.py").write_text(
      "thing = 1\n\ndef late():\n  from vlmsel_jax import high\n  return high\n")
  (pkg / "high.py").write_text("from vlmsel_jax.sub import thing\n")
  graph = import_graph(tmp_path)
  assert graph["vlmsel_jax.sub"] == {"vlmsel_jax.sub.low": f"{PACKAGE}/sub/__init__.py:1"}
  assert graph["vlmsel_jax.sub.low"] == {"vlmsel_jax.high": f"{PACKAGE}/sub/low.py:4"}
  assert graph["vlmsel_jax.high"] == {"vlmsel_jax.sub": f"{PACKAGE}/high.py:1"}
  assert knots(graph) == [["vlmsel_jax.high", "vlmsel_jax.sub", "vlmsel_jax.sub.low"]]


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert len(graph) > 50 and "vlmsel_jax.zoo.resolver" in graph["vlmsel_jax.zoo"]
  found = knots(graph)
  assert not found, "import cycles:\n" + "\n".join(describe(graph, k) for k in found)


# (module, heavy package it imports although it need not) -> why: known defects to mend, not a
# licence. The test imports these modules last, so that the others are checked first.
KNOWN_HEAVY: dict[tuple[str, str], str] = {}
HEAVY = ("transformers", "torch")


@pytest.mark.parametrize("package", ["vlmsel_jax.scores", "vlmsel_jax.models.vit"])
def test_light_packages_import_neither_transformers_nor_torch(package):
  """The package and every module in it, in a fresh interpreter: which of them imports one of
  ``HEAVY`` first."""
  known = sorted({module for module, _ in KNOWN_HEAVY})
  script = textwrap.dedent(f"""
      import importlib, json, pkgutil, sys
      package = importlib.import_module({package!r})
      names = sorted(info.name for info in
                     pkgutil.walk_packages(package.__path__, package.__name__ + "."))
      pulled = {{package.__name__: [m for m in {HEAVY!r} if m in sys.modules]}}
      for name in sorted(names, key=lambda name: name in {known!r}):
        before = set(sys.modules)
        importlib.import_module(name)
        pulled[name] = [m for m in {HEAVY!r} if m in sys.modules and m not in before]
      print(json.dumps(pulled))
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  pulled = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(pulled) > 1
  unexpected = {f"{module} imports {heavy}" for module, heavies in pulled.items()
                for heavy in heavies if (module, heavy) not in KNOWN_HEAVY}
  assert not unexpected, sorted(unexpected)
