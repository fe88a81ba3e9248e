"""Checkpoint recovery: checksums, falling back past a damaged step, a finished run run again,
and ``train`` killed with SIGKILL while it saves.

The damage cases run on small pytrees through ``Checkpointer`` directly; the end-to-end ones run
the ``train`` binary on the tiny models of tests/vlm_fixtures.py (CPU, 8 fake devices).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

import vlm_fixtures as fx
from vlmsel_jax import train
from vlmsel_jax.training import checkpoint as ckpt_lib

FLAGS = flags.FLAGS
META = {"vision": "v", "llm": "l", "stage": 1}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(scale: float) -> dict:
  return {"step": jnp.asarray(int(scale), jnp.int32),
          "params": {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * scale,
                     "b": jnp.full((8,), scale, jnp.float32)}}


def _save_steps(directory: str, steps=(1, 2, 3)) -> None:
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=len(steps))
  for step in steps:
    ckpt.save(step, _state(step), {"position": step}, META)
  ckpt.wait()
  ckpt.close()


def _largest_state_file(step_dir: str) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  return max(files, key=os.path.getsize)


def _damage(path: str, how: str) -> None:
  size = os.path.getsize(path)
  if how == "truncated":
    with open(path, "r+b") as f:
      f.truncate(size // 2)
  elif how == "zeroed":
    with open(path, "wb") as f:
      f.write(b"\0" * size)
  elif how == "missing":
    os.remove(path)
  elif how == "one byte changed":  # Same size, a plausible file: only the checksum tells.
    with open(path, "r+b") as f:
      f.seek(size - 1)
      last = f.read(1)
      f.seek(size - 1)
      f.write(bytes([last[0] ^ 0x01]))
  else:
    raise ValueError(how)


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- checksums and fallback on small trees ------------------------------------------------------

def test_each_saved_step_records_the_sha256_of_its_files(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory)
  for step in (1, 2, 3):
    record = json.load(open(os.path.join(directory, str(step), ckpt_lib.CHECKSUM_FILE)))
    assert record["algorithm"] == "sha256"
    assert "state/_METADATA" in record["files"] and "meta/metadata" in record["files"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in record["files"].values())
    assert ckpt_lib.verify_checksum(directory, step)


@pytest.mark.parametrize("how", ["truncated", "zeroed", "missing", "one byte changed"])
def test_a_damaged_latest_step_falls_back_to_the_newest_intact_one(tmp_path, caplog, how):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory)
  damaged_file = _largest_state_file(os.path.join(directory, "3"))
  _damage(damaged_file, how)
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=r"/3: cannot restore the train "):
    ckpt_lib.verify_checksum(directory, 3)

  # Evaluation / --init_from: step 2's params, a warning, and step 3 left where it is.
  caplog.set_level(logging.WARNING)
  params, meta = ckpt_lib.restore_params(directory)
  assert meta["step"] == 2
  np.testing.assert_array_equal(params["w"], np.asarray(_state(2)["params"]["w"]))
  [warning] = _warnings(caplog)
  assert "\n" not in warning
  assert warning.startswith(f"checkpoint step 3 in {directory} is damaged, using step 2 instead")
  assert os.path.isdir(os.path.join(directory, "3"))

  # Resuming: step 2's state and data position; step 3 is set aside, so the run saves it again.
  caplog.clear()
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=3)
  step, state, data = ckpt.restore_latest(_state(0), META)
  assert (step, data) == (2, {"position": 2})
  jax.tree.map(np.testing.assert_array_equal, state, _state(2))
  assert any(w.startswith(f"checkpoint step 3 in {directory} is damaged") for w in
             _warnings(caplog))
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert os.listdir(f"{directory}.damaged") == ["3"]
  assert ckpt.latest_step() == 2
  ckpt.save(3, _state(3), {"position": 3}, META)
  ckpt.wait()
  assert ckpt.restore_latest(_state(0), META)[0] == 3
  ckpt.close()


def test_a_damaged_checksum_file_makes_its_step_damaged(tmp_path, caplog):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory)
  _damage(os.path.join(directory, "3", ckpt_lib.CHECKSUM_FILE), "zeroed")
  caplog.set_level(logging.WARNING)
  assert ckpt_lib.restore_params(directory)[1]["step"] == 2
  assert "checksum file sha256.json is unreadable" in _warnings(caplog)[0]


def test_checkpoints_without_checksums_still_restore(tmp_path, caplog):
  """Steps saved before checksums were recorded restore as orbax reads them, without warning."""
  directory = str(tmp_path / "ckpt")
  _save_steps(directory)
  for step in (1, 2, 3):
    os.remove(os.path.join(directory, str(step), ckpt_lib.CHECKSUM_FILE))
  caplog.set_level(logging.WARNING)
  assert not ckpt_lib.verify_checksum(directory, 3)
  params, meta = ckpt_lib.restore_params(directory)
  assert meta["step"] == 3
  np.testing.assert_array_equal(params["b"], np.asarray(_state(3)["params"]["b"]))
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=3)
  step, state, data = ckpt.restore_latest(_state(0), META)
  ckpt.close()
  assert (step, data) == (3, {"position": 3})
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  assert not _warnings(caplog)
  # One without a checksum whose files are broken is still found damaged, by orbax's reading.
  _damage(os.path.join(directory, "3", "meta", "metadata"), "truncated")
  assert ckpt_lib.restore_params(directory)[1]["step"] == 2


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, steps=(1, 2))
  for step in (1, 2):
    _damage(_largest_state_file(os.path.join(directory, str(step))), "zeroed")
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    ckpt_lib.restore_params(directory)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"{directory}: no intact checkpoint remains (damaged: step 2, 1); "
                            f"the latest: {directory}/2: cannot restore the train state: file ")
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=2)
  with pytest.raises(ckpt_lib.CheckpointError, match="no intact checkpoint remains"):
    ckpt.restore_latest(_state(0), META)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]  # Nothing set aside when nothing resumes.


def test_an_incompatible_older_step_is_refused_not_skipped(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory)
  _damage(_largest_state_file(os.path.join(directory, "3")), "zeroed")
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=3)
  with pytest.raises(ckpt_lib.CheckpointError, match="incompatible run: llm was 'l'"):
    ckpt.restore_latest(_state(0), {**META, "llm": "other"})
  ckpt.close()


# --- the train binary: a finished run run again, a damaged last step, SIGKILL during a save -----

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("recovery")
  out = {"llm": fx.tiny_llm_dir(str(root / "llm")), "vit": fx.tiny_vit_dir(str(root / "vit"))}
  folder = root / "captions"
  folder.mkdir()
  records = fx.shape_records(24, "paired")
  with open(folder / "captions.jsonl", "w") as f:
    for i in range(len(records)):
      Image.fromarray(records[i]["image"]).save(folder / f"{i}.png")
      f.write(json.dumps({"id": i, "image": f"{i}.png", "caption": records[i]["caption"]}) + "\n")
  out["data"] = f"folder:{folder}"
  out["root"] = root
  return out


MAX_STEPS = 10


def _argv(world, output_dir, max_steps=MAX_STEPS):
  return [f"--vision_model={world['vit']}", f"--llm_model={world['llm']}", "--stage=1",
          f"--data={world['data']}", f"--output_dir={output_dir}", "--batch_size=8",
          "--max_len=32", "--learning_rate=1e-2", f"--schedule_steps={MAX_STEPS}",
          f"--max_steps={max_steps}", "--save_every=1",
          "--keep=2", "--log_every=1", "--noeval"]


def _run_here(argv):
  FLAGS.unparse_flags()
  FLAGS(["train"] + argv)
  return train.main(["train"])


def _final(output_dir):
  params, meta = ckpt_lib.restore_params(os.path.join(output_dir, "checkpoints"))
  summary = json.load(open(os.path.join(output_dir, "summary.json")))
  return params, meta, summary


@pytest.fixture(scope="module")
def reference(world):
  """An uninterrupted run of the train binary."""
  output_dir = str(world["root"] / "reference")
  _run_here(_argv(world, output_dir))
  return _final(output_dir)


def _assert_same_params(a, b):
  leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
  leaves_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_running_a_finished_run_again_keeps_its_summary(world, reference):
  _, meta, first = reference
  assert meta["step"] == MAX_STEPS
  assert {"loss", "grad_norm", "learning_rate"} <= set(first)
  _run_here(_argv(world, str(world["root"] / "reference")))
  _, meta, again = _final(str(world["root"] / "reference"))
  assert meta["step"] == MAX_STEPS and again["resumed_from"] == MAX_STEPS
  assert set(again) == set(first)
  for key in ("steps", "step", "loss", "grad_norm", "learning_rate", "tokens_per_s", "time"):
    assert again[key] == first[key], key


def test_a_damaged_last_step_is_retrained_to_the_same_result(world, reference, tmp_path, caplog):
  output_dir = str(tmp_path / "run")
  _run_here(_argv(world, output_dir, max_steps=MAX_STEPS - 2))
  checkpoints = os.path.join(output_dir, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == [str(MAX_STEPS - 3), str(MAX_STEPS - 2)]
  _damage(_largest_state_file(os.path.join(checkpoints, str(MAX_STEPS - 2))), "one byte changed")
  caplog.set_level(logging.WARNING)
  _run_here(_argv(world, output_dir))
  assert any(w.startswith(f"checkpoint step {MAX_STEPS - 2} in {checkpoints} is damaged, using "
                          f"step {MAX_STEPS - 3} instead") for w in _warnings(caplog))
  params, meta, summary = _final(output_dir)
  assert summary["resumed_from"] == MAX_STEPS - 3 and meta["step"] == MAX_STEPS
  _assert_same_params(params, reference[0])
  assert summary["loss"] == reference[2]["loss"]
  with open(os.path.join(output_dir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, MAX_STEPS + 1))


def _tmp_steps(checkpoints: str) -> list[int]:
  try:
    names = os.listdir(checkpoints)
  except FileNotFoundError:
    return []
  return [int(m.group(1)) for m in map(re.compile(r"(\d+)\.orbax-checkpoint-tmp").match, names)
          if m]


def test_kill_9_during_a_save_then_rerun_ends_as_the_uninterrupted_run(world, reference,
                                                                       tmp_path):
  """SIGKILL while orbax writes a step (its temporary directory exists), then the same command
  again: the resumed run ends bit-identical to the uninterrupted one."""
  output_dir = str(tmp_path / "killed")
  checkpoints = os.path.join(output_dir, "checkpoints")
  command = [sys.executable, "-m", "vlmsel_jax.train"] + _argv(world, output_dir)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  killed_at = None
  deadline = time.monotonic() + 120
  try:
    while proc.poll() is None and time.monotonic() < deadline:
      in_progress = [s for s in _tmp_steps(checkpoints) if s >= 3]
      if in_progress:
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = in_progress[0]
        break
      time.sleep(0.001)
  finally:
    if proc.poll() is None and killed_at is None:
      proc.kill()
    _, stderr = proc.communicate()
  assert killed_at is not None, ("no save in progress was seen before the run ended: "
                                 + stderr.decode()[-2000:])
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(output_dir, "summary.json"))

  # The same command again resumes from the last complete step and finishes the run.
  rerun = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, check=False)
  assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
  params, meta, summary = _final(output_dir)
  assert meta["step"] == MAX_STEPS
  assert 0 < summary["resumed_from"] < MAX_STEPS
  # The step before the one being saved was complete (orbax finishes one save before the next);
  # the one being saved may have completed between the listing and the kill.
  assert killed_at - 1 <= summary["resumed_from"] <= killed_at
  assert not _tmp_steps(checkpoints)
  _assert_same_params(params, reference[0])
  assert summary["loss"] == reference[2]["loss"]
  assert summary["grad_norm"] == reference[2]["grad_norm"]
  with open(os.path.join(output_dir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, MAX_STEPS + 1))
