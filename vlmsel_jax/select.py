r"""Selection policies and judging them: ``python -m vlmsel_jax.select --method=...``.

Every method has its own module under ``vlmsel_jax/selection/`` (``<name>_cli.py``); that module
defines the flags it reads (at import, the absl way; ``--vision_models``, ``--llm_models``,
``--ground_truth`` and ``--ground_truth_column`` through ``flag_util.shared``, since several
define them) and a ``run(method: str) -> dict`` that reads ``FLAGS``, calls the library, writes
``<--output_dir>/<method>.json`` with its figures and tables beside it (fixed names) and returns
the JSON it wrote. This binary only owns the flags every method shares and the dispatch.

  python -m vlmsel_jax.select --method=ac_law --table=T.csv --a_column=A --c_column=C \
      --targets=vqa,gqa --output_dir=out/ac_law
"""

from __future__ import annotations

import importlib
import importlib.util

from absl import app
from absl import flags
from absl import logging

from vlmsel_jax.runtime import errors
from vlmsel_jax.runtime import flag_util

# method -> module implementing it. Modules are imported before flag parsing so their flags exist.
METHOD_MODULES = {
    "ac_law": "vlmsel_jax.selection.ac_cli",
    "ac_policy": "vlmsel_jax.selection.ac_cli",
    "judge": "vlmsel_jax.selection.judge_cli",
    "mordal": "vlmsel_jax.selection.mordal_cli",
    "mordal_llm_similarity": "vlmsel_jax.selection.llm_similarity_cli",
    "dcd": "vlmsel_jax.selection.dcd_cli",
}

_MODULES = {}
for _method, _name in METHOD_MODULES.items():
  if _name not in _MODULES and importlib.util.find_spec(_name) is not None:
    _MODULES[_name] = importlib.import_module(_name)

METHOD = flags.DEFINE_enum("method", None, sorted(METHOD_MODULES), "Selection method to run.")
OUTPUT_DIR = flag_util.shared(flags.DEFINE_string, "output_dir", None, "Where results are "
                              "written.")
SEED = flag_util.shared(flags.DEFINE_integer, "seed", 0, "Seed of every random choice.")
K = flag_util.shared(flags.DEFINE_integer, "k", 3, "k of Recall@k / top-k metrics.")


def run_method() -> dict:
  """Runs ``--method`` with the parsed flags; returns the JSON it wrote.

  Bad input raises the method's own error (a ``ValueError`` naming the problem); ``main`` turns
  it into one line.
  """
  if METHOD.value is None:
    raise app.UsageError(f"--method is required, one of: {', '.join(sorted(METHOD_MODULES))}")
  name = METHOD_MODULES[METHOD.value]
  if name not in _MODULES:
    raise app.UsageError(f"--method={METHOD.value}: module {name} is not installed")
  if not OUTPUT_DIR.value:
    raise app.UsageError("--output_dir is required (a directory)")
  result = _MODULES[name].run(METHOD.value)
  logging.info("wrote %s/%s.json", OUTPUT_DIR.value, METHOD.value)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run_method()


def _name() -> str:
  """What opens an error line: the binary and, once parsed, its method."""
  return f"select --method={METHOD.value}" if METHOD.value else "select"


def console_main():
  """The ``vlmsel-select`` console command."""
  errors.run(main, _name)


if __name__ == "__main__":
  console_main()
