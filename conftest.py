"""Repository-root conftest: `configs` becomes importable, and JAX sees 8 CPU devices for sharding tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))  # tests/hf_reference.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
