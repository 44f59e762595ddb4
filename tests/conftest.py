"""Test setup: 8 fake CPU devices, so the pmap / shard_map paths run on any machine.

The flag must be set before JAX initialises its backends, hence at import of conftest.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if os.environ.get("TOLERANCE_REPORT"):      # measurement aid, see tests/numerics_testlib.py
  import numerics_testlib
  numerics_testlib.install_report(os.environ["TOLERANCE_REPORT"])
