"""Test setup: 8 emulated CPU devices, so sharded code is tested on one machine.

XLA reads the flag once, when the backend starts, so it is set here, before
any test module imports JAX.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
