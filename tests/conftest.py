"""Test configuration: 8 simulated CPU devices, set before JAX initialises its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Launcher subprocesses compile from scratch unless a test names a compilation cache folder.
os.environ.setdefault("HKPIPE_COMPILATION_CACHE", "off")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
