"""runtime/errors: the boundary every binary runs behind (one line, exit 2 for usage and 1 for
data, tracebacks for bugs and on request), run as a real program."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vlmsel_jax.runtime import errors

_PROGRAM = textwrap.dedent("""
    from absl import app, flags
    from vlmsel_jax.runtime import errors
    from vlmsel_jax.zoo import specs

    RAISE = flags.DEFINE_enum("raise", "none", ["none", "usage", "value", "os", "ours", "key",
                                                "multiline", "log"], "")
    COUNT = flags.DEFINE_integer("count", 1, "")

    def main(argv):
      kind = RAISE.value
      if kind == "usage":
        raise app.UsageError("--count must be odd")
      if kind == "value":
        raise ValueError("data.csv, row 3: accuracy 'x' is not a number")
      if kind == "os":
        open("/nonexistent/dir/file.csv")
      if kind == "ours":
        raise specs.ZooError("no-such-model: not a zoo name")
      if kind == "key":
        {}["bug"]
      if kind == "log":
        import logging
        from absl import logging as absl_logging
        logging.getLogger("jax._src.xla_bridge").info("library noise")
        absl_logging.warning("a warning stays")
      if kind == "multiline":
        raise ValueError("first line\\n\\n   second   line")
      print("ok", COUNT.value)

    errors.run(main, "prog")
""")


def _run(tmp_path, *args, env=None):
  script = tmp_path / "prog.py"
  script.write_text(_PROGRAM)
  return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                        cwd=tmp_path, timeout=120, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _one_line(proc) -> str:
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  return lines[0]


def test_a_good_run_is_untouched(tmp_path):
  proc = _run(tmp_path, "--count=3")
  assert proc.returncode == 0 and proc.stdout.strip() == "ok 3", proc.stderr


@pytest.mark.parametrize("kind,code,text", [
    ("usage", 2, "prog: error: --count must be odd; see --help"),
    ("value", 1, "prog: error: data.csv, row 3: accuracy 'x' is not a number"),
    ("os", 1, "prog: error: [Errno 2] No such file or directory: '/nonexistent/dir/file.csv'"),
    ("ours", 1, "prog: error: no-such-model: not a zoo name"),
    ("multiline", 1, "prog: error: first line; second line"),
])
def test_deliberate_errors_are_one_line(tmp_path, kind, code, text):
  proc = _run(tmp_path, f"--raise={kind}")
  assert proc.returncode == code
  assert _one_line(proc) == text
  assert proc.stdout == ""


def test_a_bug_keeps_its_traceback(tmp_path):
  proc = _run(tmp_path, "--raise=key")
  assert proc.returncode == 1
  assert "Traceback" in proc.stderr and "KeyError: 'bug'" in proc.stderr


@pytest.mark.parametrize("how", [["--verbose_errors"], ["VLMSEL_DEBUG=1"]])
def test_tracebacks_on_request(tmp_path, how):
  env = dict(h.split("=") for h in how if "=" in h and not h.startswith("--"))
  args = [h for h in how if h.startswith("--")]
  proc = _run(tmp_path, "--raise=value", *args, env=env)
  assert proc.returncode == 1
  assert "Traceback" in proc.stderr and "ValueError: data.csv, row 3" in proc.stderr


def test_bad_flag_values_are_one_usage_line(tmp_path):
  proc = _run(tmp_path, "--count=many")
  assert proc.returncode == 2
  line = _one_line(proc)
  assert line.startswith("prog: error: flag --count=many:") and line.endswith("see --help")


def test_an_unknown_flag_names_its_flagfile(tmp_path):
  inner = tmp_path / "inner.flags"
  inner.write_text("--count=2\n--vision_modls=a,b\n")
  outer = tmp_path / "outer.flags"
  outer.write_text(f"--count=5\n--flagfile={inner}\n")
  proc = _run(tmp_path, f"--flagfile={outer}")
  assert proc.returncode == 2
  assert _one_line(proc) == (f"prog: error: Unknown command line flag 'vision_modls' (in "
                             f"{inner}:2); see --help")
  # On the command line itself, no flagfile is named.
  proc = _run(tmp_path, "--vision_modls=a")
  assert _one_line(proc) == "prog: error: Unknown command line flag 'vision_modls'; see --help"


def test_one_line_and_deliberate():
  assert errors.one_line("a\n  b\tc\n\n") == "a; b c"
  assert errors.is_deliberate(FileNotFoundError("x"))
  assert not errors.is_deliberate(KeyError("x"))
  assert not errors.is_deliberate(RuntimeError("x"))


def test_other_packages_info_lines_are_hidden_unless_verbose(tmp_path):
  proc = _run(tmp_path, "--raise=log")
  assert proc.returncode == 0
  assert "library noise" not in proc.stderr and "a warning stays" in proc.stderr
  proc = _run(tmp_path, "--raise=log", "--verbosity=1")
  assert "library noise" in proc.stderr and "a warning stays" in proc.stderr
