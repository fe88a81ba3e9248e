"""CPU set-up shared by the benchmarks that race our JAX code against PyTorch on the CPU.

``pin_threads`` must run before jax and torch are imported: pinning the process to a subset of
cores is what limits XLA's thread pool (torch's is set with ``torch.set_num_threads``).
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo, or what ``platform`` knows elsewhere."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def pin_threads(requested: int) -> tuple[int, int]:
  """Pins this process to ``requested`` cores (0: all usable); returns (used, usable).

  Also makes jax run on the CPU even where it would pick an accelerator.
  """
  available = sorted(os.sched_getaffinity(0))
  threads = min(requested or len(available), len(available))
  if threads < len(available):
    os.sched_setaffinity(0, available[:threads])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  return threads, len(available)


def machine_line(threads: int, usable: int) -> str:
  load = os.getloadavg()
  return (f"machine: {cpu_model()} ({platform.machine()}), {platform.system()} "
          f"{platform.release()}; {os.cpu_count()} logical CPUs, {usable} usable, "
          f"{threads} used; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
