"""What setup.cfg promises: every third-party package the library imports is declared, and every
binary has a console command that runs its main."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlmsel_jax"


def _setup() -> configparser.ConfigParser:
  config = configparser.ConfigParser()
  config.read(ROOT / "setup.cfg")
  return config


def _requirement_names(text: str) -> set[str]:
  names = set()
  for line in text.strip().splitlines():
    line = line.split("#")[0].strip()
    if line:
      names.add(re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0].lower().replace("_", "-"))
  return names


def _imported_top_levels() -> set[str]:
  """Top-level module names every file of the package imports (function-level imports too)."""
  found = set()
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        found.update(a.name.split(".")[0] for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found.add(node.module.split(".")[0])
  return found - set(sys.stdlib_module_names) - {"vlmsel_jax", "__future__"}


def test_every_imported_package_is_declared():
  declared = _requirement_names(_setup()["options"]["install_requires"])
  test_only = _requirement_names(_setup()["options.extras_require"]["test"])
  distributions = importlib.metadata.packages_distributions()
  undeclared = {}
  for module in sorted(_imported_top_levels()):
    dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
    assert dists, f"{module} is imported but no installed distribution provides it"
    if not dists & declared:
      undeclared[module] = sorted(dists)
  assert not undeclared, f"imported by vlmsel_jax but not in install_requires: {undeclared}"
  # The references the tests compare against are never imported by the library.
  assert not {"torch", "captum", "scikit-learn"} & {
      d.lower() for m in _imported_top_levels() for d in distributions.get(m, [])}
  assert "pot" not in test_only, "POT is a run-time dependency; list it once"


def _binaries() -> set[str]:
  from test_layout import _binaries as programs  # pylint: disable=g-import-not-at-top
  return {name.rpartition(".")[2] for name in programs()}


def test_every_binary_has_a_console_command():
  scripts = {}
  for line in _setup()["options.entry_points"]["console_scripts"].strip().splitlines():
    name, _, target = (s.strip() for s in line.partition("="))
    scripts[name] = target
  targets = {t.split(":")[0].rsplit(".", 1)[-1] for t in scripts.values()}
  assert targets == _binaries()
  for name, target in scripts.items():
    module, _, attr = target.partition(":")
    assert name == "vlmsel-" + module.rsplit(".", 1)[-1].replace("_", "-")
    assert callable(getattr(importlib.import_module(module), attr)), target


def test_installed_console_command_runs_the_binary():
  """The command pip installed (when this checkout is installed) runs the binary's main."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  name, error = "vlmsel-select", "--method is required, one of: ac_law"
  exe = shutil.which(name, path=str(Path(sys.executable).parent))
  if exe is None:
    pytest.skip(f"{name} is not installed in this environment")
  proc = subprocess.run([exe], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and error in proc.stderr, proc.stderr[-2000:]
