"""Running training as a user would (train.py in a subprocess) and reading what it logged,
and the small built-in dataset and training batches the pipeline tests share."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MIN_CACHED_COMPILE_SECS, ROOT


def train_command(config: str, workdir, *flags: str) -> list[str]:
  script = os.path.join(ROOT, "train.py")
  return [
    sys.executable,
    script,
    f"--config={os.path.join(ROOT, config)}",
    f"--workdir={workdir}",
    *flags,
  ]


def run_train_py(config: str, workdir, *flags: str, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(
    train_command(config, workdir, *flags),
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
    env=env,
  )


def logged_losses(workdir) -> list[float]:
  """The loss of every step in metrics.jsonl; a step logged twice (re-run after a crash)
  counts with its last value."""
  by_step = {}
  path = Path(workdir, "metrics.jsonl")
  if not path.exists():
    return []
  for line in path.read_text().splitlines():
    entry = json.loads(line)
    by_step[entry["step"]] = entry["loss"]
  return [by_step[s] for s in sorted(by_step)]


def wait_for_logged_step(process, workdir, step: int, output, poll_s: float = 0.02) -> None:
  """Waits until `process` (a training run) has logged `step` in metrics.jsonl; kills it
  and fails the test, showing `output()` (its log), if it ends or takes 300 s first."""
  import pytest

  deadline = time.time() + 300
  while len(logged_losses(workdir)) < step:
    if process.poll() is not None or time.time() > deadline:
      process.kill()
      pytest.fail(f"the run ended before step {step}: {output()[-3000:]}")
    time.sleep(poll_s)


def first_batches(exp, num: int) -> list[dict]:
  """The first `num` training batches of an experiment, model inputs only."""
  iterator = iter(exp.train_dataset())
  return [{k: b[k] for k in exp.batch_fields} for b in (next(iterator) for _ in range(num))]


def small_builtin(cache_dir: str):
  """The built-in dataset the pipeline tests read (one cached copy for all of them)."""
  from vlp_jax.input_pipeline import builtin

  return builtin.ensure_builtin(
    cache_dir, seed=0, num_train=256, num_heldout=64, image_size=32, vocab_size=1000
  )


def small_tokenizer(data):
  """small_builtin's WordPiece tokenizer: 24 tokens."""
  from vlp_jax.input_pipeline import tokenizers

  return tokenizers.create_tokenizer("wordpiece", data.vocab_file, context_length=24)


def train_dataset(shards, tokenizer, **overrides):
  """pipeline.create_train_dataset with small test defaults: 8 32x32 images a batch."""
  from vlp_jax.input_pipeline import pipeline

  kwargs = dict(
    batch_size=8,
    image_size=32,
    crop_scale=(0.8, 1.0),
    flip=True,
    seed=0,
    num_workers=0,
    read_threads=2,
  )
  kwargs.update(overrides)
  return pipeline.create_train_dataset(shards, tokenizer, **kwargs)


def take(dataset, num_batches: int) -> list[dict]:
  """The first `num_batches` batches of `dataset`."""
  iterator = iter(dataset)
  return [next(iterator) for _ in range(num_batches)]


@contextlib.contextmanager
def compilation_cache(path: str):
  """JAX's persistent compilation cache in `path`: the trainer runs below compile the
  same programs (in this process and in subprocesses), so each compiles once."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {key: getattr(jax.config, key) for key in keys}
  cc.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(MIN_CACHED_COMPILE_SECS))
  try:
    yield
  finally:
    for key, value in before.items():
      jax.config.update(key, value)
    cc.reset_cache()


@contextlib.contextmanager
def fails_after(seconds: int):
  """A blocked open() or read() fails the test instead of hanging the run."""

  def interrupt(signum, frame):
    pytest.fail(f"still blocked after {seconds} s")

  previous = signal.signal(signal.SIGALRM, interrupt)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
