"""Bad input, through every binary as a user runs it: a subprocess that exits non-zero with exactly
one line on stderr (no traceback), and leaves every file it was given, and every output
directory, byte for byte as it was.

Fixed cases name each failure the project knows of; hypothesis fuzzes the feature banks and the
CSV tables the binaries read (any outcome but a traceback or a changed file is a failure).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "HF_HUB_OFFLINE": "1"}


def _bank(path, features, ids=None):
  ids = np.array([f"s{i}" for i in range(len(features))]) if ids is None else ids
  np.savez(path, features=features, ids=ids)


@pytest.fixture(name="world", scope="module")
def _world(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_inputs")
  rng = np.random.default_rng(0)
  for name in ("text", "a", "b", "c"):
    _bank(root / f"{name}.npz", rng.normal(size=(16, 8)).astype(np.float32))
  nan = rng.normal(size=(16, 8)).astype(np.float32)
  nan[3, 2] = np.nan
  _bank(root / "nan.npz", nan)
  _bank(root / "short.npz", rng.normal(size=(12, 8)).astype(np.float32))
  (root / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip archive")
  (root / "truth.csv").write_text("candidate,accuracy\na,0.5\nb,0.7\nc,0.6\n")
  (root / "bad_truth.csv").write_text("candidate,accuracy\na,0.5\nb,high\nc,0.6\n")
  (root / "nan_truth.csv").write_text("candidate,accuracy\na,0.5\nb,nan\nc,0.6\n")
  (root / "scores.csv").write_text("candidate,task,score\na,vqa,1\nb,vqa,2\nc,vqa,3\n")
  (root / "truth_tasks.csv").write_text(
      "candidate,task,accuracy\na,vqa,0.5\nb,vqa,0.7\nc,vqa,0.6\n")
  (root / "afile").write_text("a file where a directory should be\n")
  (root / "imgs").mkdir()
  lines = []
  for i in range(4):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "imgs" / f"{i}.png")
    lines.append(f'{{"id": {i}, "image": "{i}.png", "caption": "caption {i}"}}')
  (root / "imgs" / "captions.jsonl").write_text("\n".join(lines) + "\n")
  (root / "typo.flags").write_text("--metrics=cka\n--vision_modls=hog\n")
  # A finished result the failing runs must leave alone.
  proc = _python(["score", f"--banks={root}/a.npz,{root}/b.npz,{root}/c.npz",
                  f"--text_bank={root}/text.npz", "--metrics=cka", f"--output_dir={root}/out",
                  "--noprogress", "--bootstrap=0", "--permutations=0"], root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root


def _python(args, cwd):
  return subprocess.run([sys.executable, "-m", f"vlmsel_jax.{args[0]}", *args[1:]], cwd=cwd,
                        env=ENV, capture_output=True, text=True, timeout=600, check=False)


def _snapshot(root) -> dict[str, str]:
  found = {}
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return found


def _fails_cleanly(world, args, code, *needles):
  before = _snapshot(world)
  proc = _python([a.replace("{w}", str(world)) for a in args], world)
  lines = proc.stderr.strip().splitlines()
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert proc.returncode == code, (proc.returncode, lines)
  assert lines[0].startswith(f"{args[0]}"), lines[0]
  for needle in needles:
    assert needle.replace("{w}", str(world)) in lines[0], lines[0]
  assert _snapshot(world) == before, "a failing run changed files"
  return lines[0]


CASES = {
    # score
    "score: an unknown flag in a flagfile": (
        ["score", "--flagfile={w}/typo.flags"], 2, "vision_modls", "typo.flags:2"),
    "score: a bank file that is not there": (
        ["score", "--banks={w}/a.npz,{w}/missing.npz", "--text_bank={w}/text.npz",
         "--output_dir={w}/out"], 1, "missing.npz"),
    "score: a damaged bank": (
        ["score", "--banks={w}/a.npz,{w}/garbage.npz", "--text_bank={w}/text.npz",
         "--output_dir={w}/out"], 1, "garbage.npz"),
    "score: NaN features": (
        ["score", "--banks={w}/a.npz,{w}/nan.npz", "--text_bank={w}/text.npz",
         "--output_dir={w}/out", "--metrics=cka"], 1, "NaN"),
    "score: banks of other samples": (
        ["score", "--banks={w}/a.npz,{w}/short.npz", "--text_bank={w}/text.npz",
         "--output_dir={w}/out", "--metrics=cka"], 1, "short.npz"),
    "score: --output_dir is a file": (
        ["score", "--banks={w}/a.npz,{w}/b.npz", "--text_bank={w}/text.npz",
         "--output_dir={w}/afile", "--metrics=cka"], 1, "afile", "not a directory"),
    "score: a ground truth that is not a number": (
        ["score", "--banks={w}/a.npz,{w}/b.npz,{w}/c.npz", "--text_bank={w}/text.npz",
         "--ground_truth={w}/bad_truth.csv", "--output_dir={w}/out", "--metrics=cka"], 1,
        "bad_truth.csv"),
    # The reader, not a correlation deep inside, names the file and line (it once said "true").
    "score: a ground truth that is NaN": (
        ["score", "--banks={w}/a.npz,{w}/b.npz,{w}/c.npz", "--text_bank={w}/text.npz",
         "--ground_truth={w}/nan_truth.csv", "--output_dir={w}/out", "--metrics=cka"], 1,
        "nan_truth.csv:3", "finite"),
    "score: a bad flag value": (
        ["score", "--gw_solver=fast", "--synthetic_pool", "--output_dir={w}/out"], 2,
        "--gw_solver"),
    "score: a stray argument": (
        ["score", "--synthetic_pool", "--output_dir={w}/out", "extra"], 2, "unexpected"),
    # extract
    "extract: an unknown model": (
        ["extract", "--vision_models=no-such-model", "--data_dir={w}/imgs",
         "--output_dir={w}/banks"], 1, "no-such-model"),
    "extract: a missing data folder": (
        ["extract", "--vision_models=hog", "--data_dir={w}/nowhere", "--output_dir={w}/banks"],
        1, "nowhere"),
    "extract: --output_dir is a file": (
        ["extract", "--vision_models=hog", "--data_dir={w}/imgs", "--output_dir={w}/afile"], 1,
        "afile"),
    "extract: a text model as a vision model": (
        ["extract", "--vision_models=smollm2-135m", "--data_dir={w}/imgs",
         "--output_dir={w}/banks"], 1, "--vision_models", "text model"),
    # correspondence_score
    "correspondence_score: no models": (
        ["correspondence_score", "--output_dir={w}/c"], 2, "--vision_models"),
    # train
    "train: a missing data folder": (
        ["train", "--vision_model=efficientnet-lite0", "--llm_model=smollm2-135m",
         "--data=folder:{w}/nowhere", "--output_dir={w}/run"], 1, "nowhere"),
    "train: --data_fraction=0": (
        ["train", "--vision_model=efficientnet-lite0", "--llm_model=smollm2-135m",
         "--data=folder:{w}/imgs", "--data_fraction=0", "--output_dir={w}/run"], 1,
        "data_fraction"),
    "train: a mesh the devices cannot make": (
        ["train", "--vision_model=efficientnet-lite0", "--llm_model=smollm2-135m",
         "--data=folder:{w}/imgs", "--mesh=data:3", "--output_dir={w}/run"], 1, "data:3"),
    "train: a missing --init_from": (
        ["train", "--vision_model=efficientnet-lite0", "--llm_model=smollm2-135m",
         "--data=folder:{w}/imgs", "--stage=2", "--init_from={w}/nowhere",
         "--output_dir={w}/run"], 1, "nowhere"),
    "train: an LLM as the vision tower": (
        ["train", "--vision_model=smollm2-135m", "--llm_model=smollm2-135m",
         "--data=folder:{w}/imgs", "--output_dir={w}/run"], 1, "smollm2-135m"),
    # a_score, groundtruth, evaluate
    "a_score: an LLM among the vision models": (
        ["a_score", "--vision_models=hog,smollm2-135m", "--llm_model=smollm2-135m",
         "--data=folder:{w}/imgs", "--output_dir={w}/a"], 2, "smollm2-135m", "not a vision"),
    "groundtruth: repeated seeds": (
        ["groundtruth", "--vision_models=hog", "--llm_model=smollm2-135m", "--seeds=1,1",
         "--data=folder:{w}/imgs", "--output_dir={w}/gt"], 2, "--seeds"),
    "evaluate: a directory without checkpoints": (
        ["evaluate", "--output_dir={w}/nowhere"], 1, "no checkpoint"),
    # select
    "select: an unknown method": (
        ["select", "--method=oracle", "--output_dir={w}/sel"], 2, "--method"),
    "select judge: a ground truth without its columns": (
        ["select", "--method=judge", "--ground_truth={w}/truth.csv",
         "--scores={w}/scores.csv", "--output_dir={w}/sel"], 1, "truth.csv"),
    "select ac_law: missing columns": (
        ["select", "--method=ac_law", "--table={w}/truth.csv", "--a_column=a_score",
         "--c_column=c_score", "--targets=accuracy", "--output_dir={w}/sel"], 1, "a_score"),
    "select mordal: a missing curves file": (
        ["select", "--method=mordal", "--curves={w}/nowhere.csv",
         "--vision_similarity={w}/out/vision_cka.csv", "--output_dir={w}/sel"], 1,
        "nowhere.csv"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(world, case):
  args, code, *needles = CASES[case]
  _fails_cleanly(world, args, code, *needles)


def test_every_binary_is_covered():
  from test_layout import _binaries  # pylint: disable=g-import-not-at-top
  covered = {args[0] for args, *_ in CASES.values()}
  assert covered == {name.rpartition(".")[2] for name in _binaries()}


_SETTINGS = hypothesis.settings(max_examples=6, deadline=None, derandomize=True,
                                suppress_health_check=list(hypothesis.HealthCheck))

_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0.0, 1e-30, 1e30, -1.0]))


@_SETTINGS
@hypothesis.given(features=hnp.arrays(np.float32, st.tuples(st.integers(0, 18),
                                                            st.integers(0, 5)),
                                      elements=_values))
def test_fuzzed_banks_score_or_fail_cleanly(world, features):
  path = world / "fuzz.npz"
  _bank(path, features, ids=np.array([f"s{i}" for i in range(features.shape[0])]))
  before = _snapshot(world)
  proc = _python(["score", f"--banks={world}/a.npz,{path}", f"--text_bank={world}/text.npz",
                  f"--output_dir={world}/fuzz_out", "--metrics=cka", "--noprogress",
                  "--bootstrap=0", "--permutations=0"], world)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  if proc.returncode:
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert _snapshot(world) == before
  os.remove(path)


_cells = st.one_of(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                           max_size=6),
                   st.sampled_from(["a", "b", "c", "vqa", "0.5", "nan", "-1", ""]))


@_SETTINGS
@hypothesis.given(rows=st.lists(st.lists(_cells, min_size=1, max_size=4), max_size=5),
                  header=st.sampled_from(["candidate,task,accuracy", "candidate,accuracy",
                                          "task,accuracy,candidate", ""]))
def test_fuzzed_ground_truth_tables_judge_or_fail_cleanly(world, rows, header):
  import csv  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  path = world / "fuzz_truth.csv"
  path.write_text((header + "\n" if header else "") + buf.getvalue(), encoding="utf-8")
  before = _snapshot(world)
  proc = _python(["select", "--method=judge", f"--ground_truth={path}",
                  f"--scores={world}/scores.csv", f"--output_dir={world}/fuzz_sel"], world)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  if proc.returncode:
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert _snapshot(world) == before
  os.remove(path)
