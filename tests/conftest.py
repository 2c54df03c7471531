"""Tests run on 8 simulated CPU devices; set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (
      " --xla_force_host_platform_device_count=8"
      " --xla_cpu_collective_call_warn_stuck_timeout_seconds=5"
      " --xla_cpu_collective_call_terminate_timeout_seconds=20")
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
