"""Repository-root conftest: `configs` becomes importable, and JAX sees 8 CPU devices for sharding tests (unless
XLA_FLAGS names a count), compiled with the tests' compile flag (tests/xla_env.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))  # tests/hf_reference.py, tests/xla_env.py

import xla_env  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = xla_env.flags(None if xla_env.DEVICE_COUNT in os.environ.get("XLA_FLAGS", "") else 8)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
