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

A checkpoint directory may be local or any epath URI (``gs://bucket/run/checkpoints``): orbax
opens it with epath and writes the arrays with TensorStore's matching driver. Local directories
are made absolute (orbax requires it); a URI is passed on as it is.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vlmsel_jax.runtime import atomic

# Meta entries that must match for a checkpoint to be resumed (budgets and schedules may differ:
# successive halving continues a checkpoint with a larger budget).
COMPATIBILITY_KEYS = ("vision", "llm", "vlm", "stage", "lora", "trainable_shapes")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, corrupt or from an incompatible run."""


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
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data: dict, meta: dict, *, force: bool = False) -> bool:
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave(meta)), force=force)
    return bool(saved)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # orbax raises many types for a damaged directory.
      raise CheckpointError(f"{self.directory}/{step}: cannot read the checkpoint's meta: "
                            f"{type(e).__name__}: {e}".splitlines()[0]) from e

  def restore(self, step: int, like_state: Any, meta: dict) -> tuple[Any, dict]:
    """(state, data position) of ``step``; ``like_state`` gives structure, dtypes, shardings."""
    saved_meta = self.read_meta(step)
    check_compatible(saved_meta, meta, f"{self.directory}/{step}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(like_state)), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"{self.directory}/{step}: cannot restore the train state: "
                            f"{type(e).__name__}: {e}".splitlines()[0]) from e
    return out["state"], dict(out["data"])

  def close(self) -> None:
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
  """The trained params (as host arrays) and meta (plus "step") of ``directory``'s latest
  checkpoint.

  Used to start stage 2 from stage 1's projector and by evaluation.
  """
  directory = atomic.absolute(directory)
  if not atomic.isdir(directory):
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"{directory}: holds no complete checkpoint")
  try:
    meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  except Exception as e:
    raise CheckpointError(f"{directory}/{step}: cannot read the checkpoint: "
                          f"{type(e).__name__}: {e}".splitlines()[0]) from e
  finally:
    manager.close()
  meta["step"] = int(step)
  return restored["params"], meta
