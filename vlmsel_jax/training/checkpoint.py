"""Train-state checkpoints with orbax: atomic saves, keep-last-K, exact resume, clear errors.

A checkpoint step directory holds three items:

* ``state``: the TrainState (step, trained params, optimizer state) as sharded arrays;
* ``data``: the input iterator's position (JSON), so a resumed run sees exactly the batches the
  uninterrupted run would have;
* ``meta``: what the run was (models, VLM config, stage, trainable shapes). Restoring into a run
  whose ``meta`` differs in any ``COMPATIBILITY_KEYS`` entry is refused with a message naming the
  key, instead of loading projector weights into the wrong model.

orbax writes each step to a temporary directory and renames it when complete (on GCS, where a
rename is a copy, it marks a complete step with a commit file instead), so a kill during a save
leaves the previous checkpoint intact.

Once a save has completed, a content checksum is written beside it, ``<step>/sha256.json``: the
sha256 of every file of the step. Restoring verifies it first; a step whose files are missing,
truncated or changed (or that orbax cannot read) is *damaged*. Resuming (``restore_latest``) and
``restore_params`` then fall back to the newest intact step, with a warning naming the damaged
one; resuming sets damaged steps newer than it aside (``<directory>.damaged/<step>``) so the run
can save those steps again. A step saved before checksums were written has none and is restored
as orbax reads it.

A checkpoint directory may be local or any epath URI (``gs://bucket/run/checkpoints``): orbax
opens it with epath and writes the arrays with TensorStore's matching driver. Local directories
are made absolute (orbax requires it); a URI is passed on as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vlmsel_jax.runtime import atomic
from vlmsel_jax.runtime import parallel

# Meta entries that must match for a checkpoint to be resumed (budgets and schedules may differ:
# successive halving continues a checkpoint with a larger budget).
COMPATIBILITY_KEYS = ("vision", "llm", "vlm", "stage", "lora", "trainable_shapes")


# Beside each completed step's items: {"algorithm": "sha256", "files": {relative path: hex digest}}.
CHECKSUM_FILE = "sha256.json"
_ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, corrupt or from an incompatible run."""


class DamagedCheckpointError(CheckpointError):
  """One step of a checkpoint directory is damaged (an earlier step may still be intact)."""


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, str(step))


def _step_files(step_dir: str) -> list[str]:
  """The step's files (relative paths, "/"-separated, sorted), the checksum file excepted."""
  out = []
  if atomic.is_local(step_dir):
    root = atomic.local_path(step_dir)
    for here, _, names in os.walk(root):
      for name in names:
        out.append(os.path.relpath(os.path.join(here, name), root).replace(os.sep, "/"))
  else:
    # One listing per directory (GCS's epath has no recursive glob).
    pending = [(atomic.as_path(step_dir), "")]
    while pending:
      folder, prefix = pending.pop()
      for p in folder.iterdir():
        if p.is_dir():
          pending.append((p, f"{prefix}{p.name}/"))
        else:
          out.append(f"{prefix}{p.name}")
  return sorted(f for f in out if f != CHECKSUM_FILE and not f.startswith(f".{CHECKSUM_FILE}."))


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  if atomic.is_local(path):
    f = open(atomic.local_path(path), "rb")  # pylint: disable=consider-using-with
  else:
    f = atomic.as_path(path).open("rb")
  with f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def write_checksum(directory: str, step: int) -> None:
  """Records the sha256 of every file of ``directory``'s (completed) ``step``."""
  step_dir = _step_dir(directory, step)
  files = {name: _sha256(f"{step_dir}/{name}") for name in _step_files(step_dir)}
  atomic.write_json_atomic(f"{step_dir}/{CHECKSUM_FILE}", {"algorithm": "sha256", "files": files})


def verify_checksum(directory: str, step: int) -> bool:
  """Whether ``step``'s files match its recorded checksum; False when it records none (a
  checkpoint from before checksums).

  Raises:
    DamagedCheckpointError: a recorded file is missing or its content differs, or the checksum
      file itself is unreadable.
  """
  step_dir = _step_dir(directory, step)
  where = f"{directory}/{step}"
  path = f"{step_dir}/{CHECKSUM_FILE}"
  if not atomic.exists(path):
    return False
  try:
    with atomic.open_text(path) as f:
      record = json.load(f)
    files = dict(record["files"])
  except Exception as e:  # A truncated or zeroed checksum file.
    raise DamagedCheckpointError(f"{where}: cannot restore the train state: its checksum file "
                                 f"{CHECKSUM_FILE} is unreadable ({type(e).__name__})") from e
  for name, digest in sorted(files.items()):
    try:
      got = _sha256(f"{step_dir}/{name}")
    except FileNotFoundError:
      raise DamagedCheckpointError(f"{where}: cannot restore the train state: file {name} is "
                                   "missing") from None
    if got != digest:
      raise DamagedCheckpointError(f"{where}: cannot restore the train state: file {name} fails "
                                   "its sha256 checksum") from None
  return True


def _first_line(e: BaseException) -> str:
  return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]


def _no_intact(directory: str, damaged: list[tuple[int, Exception]]) -> CheckpointError:
  steps = ", ".join(str(s) for s, _ in damaged)
  return CheckpointError(f"{directory}: no intact checkpoint remains (damaged: step {steps}); "
                         f"the latest: {damaged[0][1]}")


def _warn_damaged(directory: str, damaged: list[tuple[int, Exception]], using: int) -> None:
  for step, error in damaged:
    logging.warning("checkpoint step %d in %s is damaged, using step %d instead: %s", step,
                    directory, using, error)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """Saves and restores ``{"state": pytree, "data": dict, "meta": dict}`` under ``directory``."""

  def __init__(self, directory: str, *, save_every: int, keep: int):
    if save_every < 1 or keep < 1:
      raise ValueError(f"checkpoint save_every ({save_every}) and keep ({keep}) must be >= 1")
    self.directory = atomic.absolute(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self._unchecksummed: list[int] = []  # Saved steps whose checksum is not written yet.

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data: dict, meta: dict, *, force: bool = False) -> bool:
    # A step's checksum is written once its (asynchronous) save has completed: at the first call
    # after that, without waiting for it.
    self._write_checksums(block=False)
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      self._unchecksummed.append(step)
    return bool(saved)

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._write_checksums(block=True)

  def _write_checksums(self, *, block: bool) -> None:
    if not self._unchecksummed:
      return
    if block:
      self.manager.wait_until_finished()
    elif self.manager.is_saving_in_progress():
      return
    steps, self._unchecksummed = self._unchecksummed, []
    if not parallel.is_primary():
      return
    kept = set(self.manager.all_steps())
    for step in steps:
      if step in kept:  # Not already removed by keep-last-K.
        write_checksum(self.directory, step)

  def read_meta(self, step: int) -> dict:
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # orbax raises many types for a damaged directory.
      raise DamagedCheckpointError(f"{self.directory}/{step}: cannot read the checkpoint's meta: "
                                   f"{_first_line(e)}") from e

  def restore(self, step: int, like_state: Any, meta: dict) -> tuple[Any, dict]:
    """(state, data position) of ``step``; ``like_state`` gives structure, dtypes, shardings.

    Raises:
      DamagedCheckpointError: the step fails its checksum or cannot be read.
      CheckpointError: it is from an incompatible run.
    """
    verify_checksum(self.directory, step)
    saved_meta = self.read_meta(step)
    check_compatible(saved_meta, meta, f"{self.directory}/{step}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(like_state)), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise DamagedCheckpointError(f"{self.directory}/{step}: cannot restore the train state: "
                                   f"{_first_line(e)}") from e
    return out["state"], dict(out["data"])

  def restore_latest(self, like_state: Any, meta: dict) -> tuple[int, Any, dict] | None:
    """(step, state, data position) of the newest intact step; None when there is no step.

    Damaged steps are skipped with a warning and, since the resumed run saves those steps again,
    set aside to ``<directory>.damaged/``.

    Raises:
      CheckpointError: every step is damaged, or the newest intact one is from an incompatible
        run.
    """
    damaged: list[tuple[int, Exception]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, like_state, meta)
      except DamagedCheckpointError as e:
        damaged.append((step, e))
        continue
      if damaged:
        _warn_damaged(self.directory, damaged, step)
        self._set_aside([s for s, _ in damaged])
      return step, state, data
    if damaged:
      raise _no_intact(self.directory, damaged)
    return None

  def _set_aside(self, steps: list[int]) -> None:
    if parallel.is_primary():
      aside = f"{self.directory}.damaged"
      atomic.makedirs(aside)
      for step in steps:
        target, n = f"{aside}/{step}", 1
        while atomic.exists(target):
          target, n = f"{aside}/{step}-{n}", n + 1
        src = atomic.as_path(_step_dir(self.directory, step))
        try:
          src.rename(atomic.as_path(target))
        except (OSError, NotImplementedError):  # No rename of a directory here: delete it.
          src.rmtree(missing_ok=True)
        logging.warning("set damaged checkpoint step %d aside: %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
    self.manager.reload()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def check_compatible(saved: dict, current: dict, where: str) -> None:
  for key in COMPATIBILITY_KEYS:
    a, b = saved.get(key), current.get(key)
    if a == b:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      # Name the first differing entry rather than printing two whole trees.
      sub = sorted(set(a) ^ set(b)) or sorted(k for k in a if a[k] != b[k])
      k = sub[0]
      raise CheckpointError(f"{where}: checkpoint is from an incompatible run: {key}[{k!r}] was "
                            f"{a.get(k)!r}, this run has {b.get(k)!r}")
    raise CheckpointError(f"{where}: checkpoint is from an incompatible run: {key} was {a!r}, "
                          f"this run has {b!r}")


def conform(raw: Any, like: Any, where: str = "") -> Any:
  """``raw`` (a restored tree whose dict keys came back as strings) in ``like``'s structure."""
  if isinstance(like, dict):
    if not isinstance(raw, dict):
      raise CheckpointError(f"checkpoint entry {where or '/'} is not a mapping")
    out = {}
    for k, v in like.items():
      key = k if k in raw else str(k)
      if key not in raw:
        raise CheckpointError(f"checkpoint has no entry {where}/{k}")
      out[k] = conform(raw[key], v, f"{where}/{k}")
    return out
  if tuple(np.shape(raw)) != tuple(np.shape(like)):
    raise CheckpointError(f"checkpoint entry {where} has shape {np.shape(raw)}, expected "
                          f"{np.shape(like)}")
  return raw


def latest_step(directory: str) -> int | None:
  """The step of ``directory``'s latest complete checkpoint; None when it holds none."""
  if not atomic.isdir(directory):
    return None
  manager = ocp.CheckpointManager(atomic.absolute(directory),
                                  item_names=("state", "data", "meta"))
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_params(directory: str) -> tuple[Any, dict]:
  """The trained params (as host arrays) and meta (plus "step") of ``directory``'s newest
  intact checkpoint (a damaged newer one is skipped with a warning, and left where it is).

  Used to start stage 2 from stage 1's projector and by evaluation.
  """
  directory = atomic.absolute(directory)
  if not atomic.isdir(directory):
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  manager = ocp.CheckpointManager(directory, item_names=_ITEMS)
  damaged: list[tuple[int, Exception]] = []
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"{directory}: holds no complete checkpoint")
    for step in steps:
      try:
        verify_checksum(directory, step)
        meta = dict(manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
      except DamagedCheckpointError as e:
        damaged.append((step, e))
        continue
      except Exception as e:  # orbax raises many types for a damaged directory.
        damaged.append((step, DamagedCheckpointError(
            f"{directory}/{step}: cannot read the checkpoint: {_first_line(e)}")))
        continue
      if damaged:
        _warn_damaged(directory, damaged, step)
      meta["step"] = int(step)
      return restored["params"], meta
  finally:
    manager.close()
  raise _no_intact(directory, damaged)
