"""The distributed runtime every binary shares: process start-up, device meshes, gathering.

One place decides how work is laid on the devices of every host:

* ``initialize`` starts ``jax.distributed`` (coordinator address, process count and id from
  arguments, the ``JAX_*`` environment variables, or a cluster JAX detects by itself such as a
  TPU VM pod slice); on a single host with nothing configured it does nothing.
* ``make_mesh`` turns a ``--mesh`` spec such as ``"data:2,fsdp:4"`` into a topology-aware Mesh;
  ``candidate_mesh`` / ``batch_mesh`` are the 1-D meshes of scoring and extraction.
* ``is_primary`` (only process 0 writes files) and ``gather_to_host`` (a global, possibly
  multi-host sharded array → the same NumPy array on every process).

No jax.pmap: sharded work is jax.jit / jax.shard_map over a Mesh.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

CANDIDATE_AXIS = "candidates"
BATCH_AXIS = "batch"

# Environment variables read when an argument of ``initialize`` is not given (the first is also
# JAX's own name for it).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_initialized = False


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name} must be an integer, got {value!r}") from None


def _cluster_detected() -> bool:
  """Whether JAX would find the distributed settings by itself (TPU VM pod, SLURM, MPI, GKE).

  Uses JAX's own cluster detection, so a pod slice is initialized exactly as
  ``jax.distributed.initialize()`` with no arguments would be. The detection classes are JAX
  internals; if they move, we fall back to "no cluster" (single host), which is always safe.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    envs = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False
  for env in envs:
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return True
    except Exception:  # pylint: disable=broad-except  # A failed probe means "not this one".
      continue
  return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
  """Starts the multi-process runtime once; a no-op on a single host with nothing configured.

  Each setting comes from its argument, else from ``$JAX_COORDINATOR_ADDRESS``,
  ``$JAX_NUM_PROCESSES``, ``$JAX_PROCESS_ID``. With all three known, ``jax.distributed``
  is started with them; with none known, it is started with no arguments only when JAX detects
  a cluster by itself (a TPU VM pod slice, SLURM, Open MPI, GKE), and otherwise nothing happens
  (one process, its local devices). Some but not all of the three is an error. Must run before
  anything touches a device (``jax.devices()``, the first jitted call). Calling again after a
  successful start does nothing.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: number of processes (usually one per host).
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: restrict this process to these local devices (GPU hosts running one
      process per device).

  Raises:
    ValueError: half-specified or invalid settings, or JAX already started single-process.
  """
  global _initialized
  if _initialized or _distributed_is_initialized():
    _initialized = True
    return
  address = coordinator_address or os.environ.get(ENV_COORDINATOR, "").strip() or None
  count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  given = {"coordinator_address": address, "num_processes": count, "process_id": index}
  missing = [name for name, value in given.items() if value is None]
  if len(missing) == 3:
    if not _cluster_detected():
      return  # A single host: JAX uses its local devices, nothing to start.
    _start(local_device_ids=local_device_ids)
    return
  if missing:
    have = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None)
    raise ValueError(f"distributed settings are incomplete: {have} given but "
                     f"{', '.join(missing)} missing (set all three flags or $JAX_* variables, "
                     "or none on a single host)")
  if count < 1:
    raise ValueError(f"num_processes must be >= 1, got {count}")
  if not 0 <= index < count:
    raise ValueError(f"process_id must be in [0, {count}), got {index}")
  if ":" not in address:
    raise ValueError(f"coordinator_address must be host:port, got {address!r}")
  _start(coordinator_address=address, num_processes=count, process_id=index,
         local_device_ids=local_device_ids)


def set_cpu_devices(count: int) -> int:
  """Makes the CPU backend ``count`` devices (-1: one per usable core); returns the count.

  Must run before anything touches a device. A no-op (returning 0) where XLA_FLAGS already
  forces a host device count (tests set 8). Raises ValueError once devices exist.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0
  if count == -1:
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if count < 1:
    raise ValueError(f"--cpu_devices must be -1, 0 or positive, got {count}")
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    if jax.devices("cpu") and len(jax.devices("cpu")) == count:
      return count
    raise ValueError("--cpu_devices must be set before JAX starts (devices already exist)")
  jax.config.update("jax_num_cpu_devices", count)
  return count


def _distributed_is_initialized() -> bool:
  is_init = getattr(jax.distributed, "is_initialized", None)
  return bool(is_init()) if is_init is not None else False


def _start(**kwargs) -> None:
  global _initialized
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if "before" in str(e) or "already" in str(e):
      raise ValueError("jax.distributed must be initialized before any device is used "
                       f"(call vlmsel_jax.runtime.parallel.initialize first): {e}") from None
    raise
  _initialized = True


def is_primary() -> bool:
  """Whether this is process 0, the one that writes result files and logs."""
  return jax.process_index() == 0


def gather_to_host(x: jax.Array) -> np.ndarray:
  """A NumPy copy of the whole global array ``x``, the same on every process.

  ``x`` may be sharded over devices of several hosts; every process must call this (it is a
  collective when ``x`` spans hosts).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ----------------------------------------------------------------------------------------------
# Meshes.


def parse_mesh_spec(spec: str, device_count: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """``"data:2,fsdp:-1"`` → ((2, device_count // 2), ("data", "fsdp")); one size may be -1."""
  if not spec or not spec.strip():
    raise ValueError("empty mesh spec; expected e.g. 'data:-1' or 'data:2,fsdp:4'")
  names, sizes = [], []
  for part in spec.split(","):
    name, sep, size = part.strip().partition(":")
    name, size = name.strip(), size.strip()
    if not sep or not name or not name.isidentifier():
      raise ValueError(f"mesh spec {spec!r}: {part.strip()!r} is not name:size")
    try:
      sizes.append(int(size))
    except ValueError:
      raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} is not an integer") from None
    if sizes[-1] == 0 or sizes[-1] < -1:
      raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} must be >= 1 or -1")
    if name in names:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} appears twice")
    names.append(name)
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh spec {spec!r}: only one axis may have size -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if device_count % fixed:
      raise ValueError(f"mesh spec {spec!r}: {device_count} devices are not divisible by the "
                       f"fixed axis sizes (product {fixed})")
    sizes[free[0]] = device_count // fixed
  elif fixed != device_count:
    raise ValueError(f"mesh spec {spec!r}: axis sizes multiply to {fixed} but there are "
                     f"{device_count} devices")
  return tuple(sizes), tuple(names)


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A Mesh from a ``--mesh`` spec such as ``"data:2,fsdp:4"`` or ``"candidates:-1"``.

  Axis names are free; one size may be -1 (the remaining devices); the sizes must multiply to
  the device count (default: every device of every host). The device order comes from
  ``jax.make_mesh``, which follows the physical topology on TPU (rings, tori). Axes are
  ``AxisType.Auto`` (sharding by annotations, as ``jax.sharding.Mesh`` has always done), not
  ``jax.make_mesh``'s newer ``Explicit`` default.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices given")
  shape, names = parse_mesh_spec(spec, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, names, axis_types=auto, devices=devices)


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
