"""Test setup: 8 simulated CPU devices, small configs, a shared tiny built-in dataset."""

import contextlib
import os
import sys

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# torchvision must be imported before TensorFlow, or the process segfaults.
with contextlib.suppress(ImportError):
  import torchvision  # noqa: F401

import pytest  # noqa: E402

from tests.configs import tiny  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  """One built-in dataset cache for the whole session (generation costs seconds)."""
  return str(tmp_path_factory.mktemp("vlp_cache"))


@pytest.fixture
def tiny_config(cache_dir):
  """A seconds-to-train config on the built-in dataset, unlocked for the test to edit."""
  config = tiny.get_config(f"cache_dir={cache_dir}")
  config.unlock()
  return config
