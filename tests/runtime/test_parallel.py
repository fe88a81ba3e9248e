"""vlmsel_jax.runtime.parallel: distributed start-up, --mesh specs, gathering (8 simulated devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from vlmsel_jax.runtime import parallel
from vlmsel_jax.runtime import flags as runtime_flags


@pytest.fixture(name="calls")
def _calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of starting anything."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(parallel, "_initialized", False)
  monkeypatch.setattr(parallel, "_distributed_is_initialized", lambda: False)
  for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_does_nothing_on_a_single_unconfigured_host(calls, monkeypatch):
  monkeypatch.setattr(parallel, "_cluster_detected", lambda: False)
  parallel.initialize()
  assert calls == []


def test_this_machine_is_not_detected_as_a_cluster():
  assert parallel._cluster_detected() is False  # pylint: disable=protected-access


def test_initialize_lets_jax_detect_a_pod(calls, monkeypatch):
  monkeypatch.setattr(parallel, "_cluster_detected", lambda: True)
  parallel.initialize()
  assert calls == [{"local_device_ids": None}]


def test_initialize_from_arguments_once(calls):
  parallel.initialize("10.0.0.2:8476", 4, 3)
  parallel.initialize("10.0.0.2:8476", 4, 3)  # Idempotent.
  assert calls == [{"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3,
                    "local_device_ids": None}]


def test_initialize_from_environment_and_arguments_override_it(calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  parallel.initialize(process_id=0)
  assert calls == [{"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 0,
                    "local_device_ids": None}]


@pytest.mark.parametrize("kwargs, env, match", [
    ({"num_processes": 2}, {}, r"^distributed settings are incomplete: num_processes=2 given "
     r"but coordinator_address, process_id missing"),
    ({"coordinator_address": "h:1"}, {"JAX_PROCESS_ID": "0"}, r"num_processes missing"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, r"^\$JAX_NUM_PROCESSES must be an integer, got 'two'$"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {},
     r"^process_id must be in \[0, 2\), got 2$"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, {},
     r"^num_processes must be >= 1, got 0$"),
    ({"coordinator_address": "host", "num_processes": 1, "process_id": 0}, {},
     r"^coordinator_address must be host:port, got 'host'$"),
])
def test_bad_settings_are_one_clear_error(calls, monkeypatch, kwargs, env, match):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match=match):
    parallel.initialize(**kwargs)
  assert calls == []


def test_runtime_flags_feed_initialize(calls):
  fl = flags.FLAGS
  fl.unparse_flags()
  fl(["prog", "--coordinator_address=c:9", "--num_processes=3", "--process_id=2"])
  try:
    runtime_flags.initialize_from_flags()
  finally:
    fl.unparse_flags()
    fl(["prog"])
  assert calls == [{"coordinator_address": "c:9", "num_processes": 3, "process_id": 2,
                    "local_device_ids": None}]


@pytest.mark.parametrize("spec, shape, names", [
    ("data:2,fsdp:4", (2, 4), ("data", "fsdp")),
    ("data:-1,fsdp:1", (8, 1), ("data", "fsdp")),
    ("data:2,fsdp:-1", (2, 4), ("data", "fsdp")),
    (" candidates : -1 ", (8,), ("candidates",)),
    ("a:2,b:2,c:2", (2, 2, 2), ("a", "b", "c")),
])
def test_make_mesh(spec, shape, names):
  mesh = parallel.make_mesh(spec)
  assert mesh.devices.shape == shape and mesh.axis_names == names
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_on_given_devices():
  mesh = parallel.make_mesh("x:-1", jax.devices()[:2])
  assert mesh.devices.shape == (2,) and set(mesh.devices.flat) == set(jax.devices()[:2])


@pytest.mark.parametrize("spec, match", [
    ("data:3,fsdp:2", r"^mesh spec 'data:3,fsdp:2': axis sizes multiply to 6 but there are 8 "
     r"devices$"),
    ("data:-1,fsdp:3", r"8 devices are not divisible by the fixed axis sizes \(product 3\)"),
    ("data:-1,fsdp:-1", r"only one axis may have size -1"),
    ("data", r"'data' is not name:size"),
    ("data:two", r"size of axis 'data' is not an integer"),
    ("data:0", r"size of axis 'data' must be >= 1 or -1"),
    ("data:2,data:4", r"axis 'data' appears twice"),
    ("", r"empty mesh spec"),
])
def test_bad_mesh_spec_is_one_line(spec, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(spec)


def test_gather_to_host_of_a_sharded_array():
  mesh = parallel.make_mesh("data:4,model:2")
  x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data", "model")))
  got = parallel.gather_to_host(sharded * 2)
  assert isinstance(got, np.ndarray)
  np.testing.assert_array_equal(got, 2 * x)
  np.testing.assert_array_equal(parallel.gather_to_host(jnp.ones(3)), np.ones(3))


def test_is_primary_in_a_single_process():
  assert parallel.is_primary()


def _python(code: str, xla_flags: str | None) -> str:
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_cpu_devices_splits_the_host_before_jax_starts():
  code = ("import jax; from vlmsel_jax.runtime import parallel; n = parallel.set_cpu_devices(3); "
          "print(n, jax.device_count())")
  assert _python(code, None) == "3 3"
  # XLA_FLAGS' count wins (the tests' 8 fake devices), and nothing is changed.
  assert _python(code, "--xla_force_host_platform_device_count=2") == "0 2"
  late = ("import jax; from vlmsel_jax.runtime import parallel; jax.devices()\n"
          "try:\n  parallel.set_cpu_devices(3)\nexcept ValueError as e:\n  print(e)")
  assert _python(late, None) == ("--cpu_devices must be set before JAX starts (devices already "
                                 "exist)")
