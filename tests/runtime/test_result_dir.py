"""runtime/result_dir: a result directory replaced as a unit, one writer at a time, and whole
after kill -9 at any point."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vlmsel_jax.runtime import result_dir

_FILES = ("scores.json", "scores.csv", "report.md")


def _fill(generation: int, names=_FILES):
  def fill(staging: str) -> None:
    for name in names:
      with open(os.path.join(staging, name), "w") as f:
        f.write(f"generation {generation}\n")
  return fill


def _contents(directory) -> dict[str, str]:
  return {name: open(os.path.join(directory, name), errors="replace").read()
          for name in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, name))}


def test_a_new_result_and_its_manifest(tmp_path):
  target = str(tmp_path / "out")
  written = result_dir.replace(target, _fill(1))
  assert written == [os.path.join(target, n) for n in sorted(_FILES)]
  assert result_dir.read_manifest(target) == sorted(_FILES)
  assert {n: c for n, c in _contents(target).items() if n != result_dir.MANIFEST} == {
      n: "generation 1\n" for n in _FILES}
  # Nothing is left beside it: no staging directory, no lock file.
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_replacing_drops_the_old_result_and_keeps_everything_else(tmp_path):
  target = tmp_path / "out"
  result_dir.replace(str(target), _fill(1, _FILES + ("extra.csv",)))
  (target / "notes.txt").write_text("a user's file")
  (target / "cache").mkdir()
  (target / "cache" / "bank.npz").write_bytes(b"bank")
  inode = (target / "cache" / "bank.npz").stat().st_ino
  result_dir.replace(str(target), _fill(2))
  files = _contents(target)
  # extra.csv belonged to the old result: it goes with it, so nothing of run 1 stands beside
  # run 2's files.
  assert "extra.csv" not in files
  assert files["notes.txt"] == "a user's file"
  assert all(files[n] == "generation 2\n" for n in _FILES)
  assert (target / "cache" / "bank.npz").read_bytes() == b"bank"
  assert (target / "cache" / "bank.npz").stat().st_ino == inode  # carried by a hard link
  assert result_dir.read_manifest(str(target)) == sorted(_FILES)


def test_a_failing_fill_leaves_the_old_result_untouched(tmp_path):
  target = tmp_path / "out"
  result_dir.replace(str(target), _fill(1))
  before = _contents(target)

  def fill(staging):
    _fill(2)(staging)
    raise ValueError("bad input")

  with pytest.raises(ValueError, match="bad input"):
    result_dir.replace(str(target), fill)
  assert _contents(target) == before
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_file_is_not_a_result_directory(tmp_path):
  target = tmp_path / "out"
  target.write_text("not a directory")
  with pytest.raises(result_dir.OutputDirError, match="exists and is not a directory"):
    result_dir.replace(str(target), _fill(1))
  assert target.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_parent_is_one_error(tmp_path):
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(0o500)
  try:
    with pytest.raises(result_dir.OutputDirError, match="cannot write"):
      result_dir.replace(str(parent / "out"), _fill(1))
  finally:
    parent.chmod(0o700)


_HOLD = textwrap.dedent("""
    import sys, time
    from vlmsel_jax.runtime import result_dir
    with result_dir.locked(sys.argv[1]):
      print("held", flush=True)
      time.sleep(60)
""")


def test_a_second_writer_is_refused_until_the_first_dies(tmp_path):
  target = str(tmp_path / "out")
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, target], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(result_dir.OutputDirError,
                       match=rf"another run is writing it .*pid {holder.pid}"):
      result_dir.replace(target, _fill(1))
    assert not os.path.exists(target)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The kernel released the dead holder's lock.
  result_dir.replace(target, _fill(1))
  assert result_dir.read_manifest(target) == sorted(_FILES)


def test_the_lock_is_reentrant_within_a_process(tmp_path):
  target = str(tmp_path / "out")
  with result_dir.locked(target):
    result_dir.replace(target, _fill(1))
    assert os.path.exists(result_dir.lock_path(target))
  assert not os.path.exists(result_dir.lock_path(target))


def test_what_killed_runs_left_is_cleaned_up(tmp_path):
  target = tmp_path / "out"
  result_dir.replace(str(target), _fill(1))
  stale = tmp_path / ".out.tmp-abc123"
  stale.mkdir()
  (stale / "scores.json").write_text("half")
  result_dir.replace(str(target), _fill(2))
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_without_exchange_two_renames_and_recovery(tmp_path, monkeypatch):
  monkeypatch.setattr(result_dir, "_exchange", lambda a, b: False)
  target = tmp_path / "out"
  result_dir.replace(str(target), _fill(1))
  result_dir.replace(str(target), _fill(2))
  assert _contents(target)["scores.json"] == "generation 2\n"
  # A run killed between its two renames: the old result aside, the new one in staging.
  os.rename(target, tmp_path / ".out.old-xyz")
  (tmp_path / ".out.tmp-xyz").mkdir()
  with result_dir.locked(str(target)):
    assert _contents(target)["scores.json"] == "generation 2\n"
  assert sorted(os.listdir(tmp_path)) == ["out"]


_LOOP = textwrap.dedent("""
    import os, sys
    from vlmsel_jax.runtime import result_dir
    target, generation = sys.argv[1], 0
    def fill(staging):
      for i in range(12):
        with open(os.path.join(staging, f"part{i}.txt"), "w") as f:
          f.write(f"generation {generation}\\n" * 200)
    print("started", flush=True)
    while True:
      generation += 1
      result_dir.replace(target, fill)
""")


def test_kill_9_at_any_point_leaves_one_whole_result(tmp_path):
  target = tmp_path / "out"
  rng = random.Random(0)
  seen = set()
  for _ in range(12):
    proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(target)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not target.exists():
      continue  # killed before its first result
    with result_dir.locked(str(target)):  # the next run's clean-up
      files = _contents(target)
    manifest = json.loads(files.pop(result_dir.MANIFEST))["files"]
    assert sorted(files) == sorted(manifest) == sorted(f"part{i}.txt" for i in range(12))
    assert len(set(files.values())) == 1, "a mix of two results"
    seen.add(next(iter(files.values())))
    assert sorted(os.listdir(tmp_path)) == ["out"]
  assert len(seen) >= 2  # the kills fell at different points


def test_kill_9_of_score_leaves_the_old_result_or_the_new_one(tmp_path):
  """The score binary itself, killed at random points while it replaces a result: its
  --output_dir always holds one whole result, the old run's or the new one's."""
  def score(seed, out):
    return subprocess.Popen(
        [sys.executable, "-m", "vlmsel_jax.score", "--synthetic_pool", "--synthetic_n=40",
         "--metrics=cka,rsa", f"--seed={seed}", f"--output_dir={out}", "--noprogress",
         "--bootstrap=0", "--permutations=0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})

  whole = {}
  for seed in (0, 1):
    out = tmp_path / f"whole{seed}"
    start = time.time()
    assert score(seed, out).wait() == 0
    took = time.time() - start
    whole[seed] = _contents(out)["scores.csv"]
  assert whole[0] != whole[1]
  target = tmp_path / "out"
  assert score(0, target).wait() == 0
  rng = random.Random(1)
  for _ in range(4):
    proc = score(1, target)
    time.sleep(rng.uniform(0.5, 1.0) * took)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with result_dir.locked(str(target)):
      files = _contents(target)
    manifest = json.loads(files.pop(result_dir.MANIFEST))["files"]
    assert sorted(files) == sorted(manifest)
    assert files["scores.csv"] in (whole[0], whole[1])
    assert json.loads(files["scores.json"])["run"]["seed"] == (
        0 if files["scores.csv"] == whole[0] else 1)
    assert sorted(os.listdir(tmp_path)) == ["out", "whole0", "whole1"]
