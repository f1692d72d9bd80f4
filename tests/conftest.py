"""Test setup: 8 simulated CPU devices, small configs, a shared tiny built-in dataset."""

import atexit
import contextlib
import os
import shutil
import sys
import tempfile

# The tests' programs are tiny and many, so compiling them dominates the suite: LLVM at
# -O0 compiles them faster than its optimised code would run them (one run each: 299 -> 188 s
# for test_vlc_finetune.py and test_methods.py, the 299 partly beside other work).
# XLA's newer CPU fusion emitters compile a tiny train step 2.5x slower than the classic
# ones (16.5 vs 6.5 s, same loss bits; tiny CLIP step, 2026-12-07).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# Programs that compile faster stay out of the persistent cache: with every eager op's
# program written there, test_models.py took 40 s instead of 27-29, and the whole suite
# 1,079 and 1,650 s in two runs against 1,167 s at 0.5 (2026-12-03).
MIN_CACHED_COMPILE_SECS = "0.5"


def xla_flags(device_count: int = 8) -> str:
  """XLA_FLAGS for a test process (or a subprocess) with `device_count` CPU devices."""
  return f"--xla_force_host_platform_device_count={device_count} {FAST_COMPILE}"


# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags()).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite runs on the CPU: with libtpu installed (requirements-dev.txt, for the
# pre-flight's deviceless TPU compiles) jax would first look for a TPU, and warn.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Each xdist worker may load libtpu for those compiles (no TPU is touched).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent XLA compilation cache for the session, its pytest-xdist workers and the
# train.py subprocesses the tests start: many tests compile the same tiny programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="vlp_jax_tests_xla_")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = MIN_CACHED_COMPILE_SECS
  # A size bound turns on the cache's file lock, so concurrent workers never read a
  # half-written entry.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)

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
