"""Running a program as several local JAX processes, as a pod slice runs it on every worker."""

from __future__ import annotations

import os
import socket
import subprocess


def free_port() -> int:
  """A free localhost TCP port for the JAX coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
  """This environment with ``devices`` fake CPU devices per process and no inherited
  distributed settings (the processes get theirs on the command line)."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  return env


def run_processes(commands: list[list[str]], devices: int, timeout: float,
                  merge_stderr: bool = False) -> list[subprocess.CompletedProcess]:
  """Starts every command at once and waits for all; a hung or failed peer never outlives the
  call (they are killed on timeout or error, which then propagates)."""
  procs = [subprocess.Popen(c, env=cpu_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                            text=True) for c in commands]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return results
