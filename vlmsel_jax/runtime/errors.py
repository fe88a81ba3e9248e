"""The error boundary of every binary: an error raised on purpose ends as one line on stderr.

``run(main, "score")`` stands in for ``app.run(main)``. What it does with what escapes:

- a bad command line (an unknown flag, also one inside a ``--flagfile``, which it names; a bad
  flag value; ``app.UsageError``): one line ``score: error: ...`` and exit code 2, no help dump;
- an error raised on purpose (``ValueError`` and ``OSError``, which our checks raise, and every
  exception class of this package): one line and exit code 1;
- anything else is a bug and keeps its traceback.

``--verbose_errors`` or ``VLMSEL_DEBUG=1`` shows the traceback of every error.

Other packages' INFO log lines (JAX probing for backends, orbax describing its checkpoint
handlers) are hidden unless ``--verbosity`` is 1 or more, so that a failing run says one thing;
this package's own INFO lines and everyone's warnings stay.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, NoReturn, Sequence

import logging as std_logging

from absl import app
from absl import flags
from absl import logging

VERBOSE_ERRORS = flags.DEFINE_bool(
    "verbose_errors", False, "Show the traceback of every error, not only one line (also: "
    "VLMSEL_DEBUG=1 in the environment).")

USAGE_EXIT = 2
DATA_EXIT = 1


def _verbose() -> bool:
  if os.environ.get("VLMSEL_DEBUG", "") not in ("", "0"):
    return True
  try:
    return bool(VERBOSE_ERRORS.value)
  except flags.UnparsedFlagAccessError:
    return "--verbose_errors" in sys.argv


def one_line(message: object) -> str:
  """A message on one line: its lines joined, runs of blanks collapsed."""
  lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
  return re.sub(r"\s+", " ", "; ".join(lines)) or "(no message)"


Name = str | Callable[[], str]


def _resolve(name: Name) -> str:
  if isinstance(name, str):
    return name
  try:
    return name()
  except Exception:  # pylint: disable=broad-except  (e.g. flags not parsed yet)
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] or "vlmsel"


def _fail(name: Name, message: object, code: int) -> NoReturn:
  sys.stderr.write(f"{_resolve(name)}: error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(code)


def is_deliberate(error: BaseException) -> bool:
  """Whether ``error`` is one we raise on purpose (a bad input), not a bug."""
  if isinstance(error, (ValueError, OSError)):
    return True
  return type(error).__module__.split(".")[0] == "vlmsel_jax"


def _flagfiles(argv: Sequence[str]) -> list[str]:
  """The flagfiles a command line reads, nested ones included, in order."""
  found, queue = [], [a.split("=", 1)[1] for a in argv if a.startswith("--flagfile=")]
  while queue:
    path = queue.pop(0)
    if path in found:
      continue
    found.append(path)
    try:
      with open(path, encoding="utf-8") as f:
        queue += [line.strip().split("=", 1)[1] for line in f
                  if line.strip().startswith("--flagfile=")]
    except OSError:
      pass
  return found


def _holder_of(flag: str, argv: Sequence[str]) -> str | None:
  """The flagfile that sets ``--flag`` (None when the command line itself does)."""
  pattern = re.compile(rf"^\s*--(no)?{re.escape(flag)}(=|\s*$)")
  if any(pattern.match(a) for a in argv[1:]):
    return None
  for path in _flagfiles(argv):
    try:
      with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          if pattern.match(line):
            return f"{path}:{number}"
    except OSError:
      continue
  return None


def parse_flags(name: Name) -> Callable[[list[str]], list[str]]:
  """An ``app.run`` flags parser whose errors are one line naming the flag (and flagfile)."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
      where = _holder_of(e.flagname, argv)
      _fail(name, f"{e}" + (f" (in {where})" if where else "") + "; see --help", USAGE_EXIT)
    except flags.Error as e:
      _fail(name, f"{e}; see --help", USAGE_EXIT)

  return parse


def guard(main: Callable[[list[str]], object], name: Name) -> Callable[[list[str]], object]:
  """``main`` with the boundary around it (for ``app.run``)."""

  def guarded(argv: list[str]) -> object:
    try:
      return main(argv)
    except app.UsageError as e:
      if _verbose():
        raise
      _fail(name, f"{e}; see --help", USAGE_EXIT)
    except Exception as e:  # pylint: disable=broad-except
      if _verbose() or not is_deliberate(e):
        raise
      _fail(name, e, DATA_EXIT)

  return guarded


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class OwnInfoOnly(std_logging.Filter):
  """Lets through warnings and errors, and INFO lines of this package's own modules."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR):
      return True
    try:
      return flags.FLAGS.verbosity >= 1
    except flags.UnparsedFlagAccessError:
      return False


def run(main: Callable[[list[str]], object], name: Name) -> None:
  """``app.run(main)`` behind the boundary; ``name`` (or what it returns, once the flags are
  parsed) opens every error line."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
    handler.addFilter(OwnInfoOnly())
  app.run(guard(main, name), flags_parser=parse_flags(name))
