"""The multi-process flags every binary shares, and starting the runtime from them.

  python -m vlmsel_jax.score --coordinator_address=10.0.0.2:8476 --num_processes=4 \
      --process_id=$WORKER ...

Unset flags fall back to ``$JAX_COORDINATOR_ADDRESS`` / ``$JAX_NUM_PROCESSES`` /
``$JAX_PROCESS_ID``, and with none of them JAX's own cluster detection (TPU VM pod slices) or a
plain single-host run; see ``vlmsel_jax.runtime.parallel.initialize``. Binaries import this module for
its flags and call ``initialize_from_flags()`` first thing in ``main``.
"""

from __future__ import annotations

from absl import flags

from vlmsel_jax.runtime import parallel

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's JAX coordinator, for runs over "
    "several processes/hosts (default: $JAX_COORDINATOR_ADDRESS; on a TPU VM pod slice JAX "
    "finds it by itself; unset on a single host).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run (default: "
    "$JAX_NUM_PROCESSES, or auto-detected on TPU pods).", lower_bound=1)
CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Split this host's CPU into this many JAX devices (-1: one per usable "
    "core; 0: JAX's default, one). Data-parallel work such as extraction then runs one shard "
    "per device: XLA:CPU runs the many small per-image, per-head attention matmuls of one "
    "device on one thread, so one device per core used all cores for them (ViT-B/16 on 2 "
    "cores: benchmarks/README.md). Ignored on accelerators and where XLA_FLAGS already sets "
    "--xla_force_host_platform_device_count.", lower_bound=-1)
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, --num_processes) (default: "
    "$JAX_PROCESS_ID, or auto-detected on TPU pods).", lower_bound=0)


def initialize_from_flags() -> None:
  """``--cpu_devices``, then ``parallel.initialize`` with the three flags (None where unset)."""
  if CPU_DEVICES.value:
    parallel.set_cpu_devices(CPU_DEVICES.value)
  parallel.initialize(coordinator_address=COORDINATOR_ADDRESS.value,
                      num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value)
