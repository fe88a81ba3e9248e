"""Device meshes shared by every binary: one place that decides how work is laid on devices.

Only what the binaries need today: 1-D meshes over all devices for embarrassingly parallel axes
(candidates of the scoring core, the batch of feature extraction), and padding a stacked axis to
a multiple of the device count. No jax.pmap:
sharded work is jax.jit / jax.shard_map over a Mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

CANDIDATE_AXIS = "candidates"
BATCH_AXIS = "batch"


def candidate_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``candidates`` over ``devices`` (default: every device of every host)."""
  devices = np.asarray(jax.devices() if devices is None else list(devices))
  if devices.size == 0:
    raise ValueError("candidate_mesh: no devices given")
  return jax.sharding.Mesh(devices.reshape(-1), (CANDIDATE_AXIS,))


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh named ``batch`` over ``devices`` (default: every device)."""
  devices = np.asarray(jax.devices() if devices is None else list(devices))
  if devices.size == 0:
    raise ValueError("batch_mesh: no devices given")
  return jax.sharding.Mesh(devices.reshape(-1), (BATCH_AXIS,))


def pad_to_multiple(items: list, multiple: int) -> list:
  """``items`` extended by repeating its last element up to a multiple of ``multiple``.

  Repeating a real item (rather than zeros) keeps padded slots numerically benign: a solver on
  an all-zero problem can divide by zero. Callers drop the padded results.
  """
  if not items:
    raise ValueError("pad_to_multiple: nothing to pad")
  return items + [items[-1]] * (-len(items) % multiple)
