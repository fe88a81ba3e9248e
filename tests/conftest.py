"""Test set-up: simulate 8 CPU devices so sharded code paths run, unless the caller chose."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
