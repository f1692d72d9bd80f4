"""Running training as a user would (train.py in a subprocess) and reading what it logged,
and the small built-in dataset and training batches the pipeline tests share."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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


@dataclasses.dataclass
class ScriptResult:
  """What a run of an entry point left: its exit status, stdout and stderr (log lines too)."""

  returncode: int
  stderr: str
  stdout: str


_loaded_script: dict[str, tuple[ModuleType, set[str]]] = {}


def _script_module(script: str) -> ModuleType:
  """train.py or eval.py loaded once per test process. Both define --config and
  --workdir, so loading the other one first removes the flags the previous one defined."""
  from absl import flags

  if script in _loaded_script:
    return _loaded_script[script][0]
  for _, defined in _loaded_script.values():
    # eval.py defines --config at run time, from its argv.
    for name in (defined | {"config"}) & set(flags.FLAGS):
      delattr(flags.FLAGS, name)
  _loaded_script.clear()
  # train.py calls vlp_jax.train, whose flags were removed above: import it afresh.
  sys.modules.pop("vlp_jax.train", None)
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(f"_entry_{Path(script).stem}", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  _loaded_script[script] = (module, set(flags.FLAGS) - before)
  return module


def run_script(script: str, *args: str) -> ScriptResult:
  """Runs `python <script> <args>` in this process: the same flag parsing, user-error
  reporting and exit status as the subprocess, without a second interpreter importing
  JAX and TensorFlow (about 15 CPU-seconds). For what is not a process's behaviour."""
  from absl import flags
  from absl import logging as absl_logging

  from vlp_jax import cli

  path = os.path.join(ROOT, script)
  module = _script_module(path)
  flags.FLAGS.unparse_flags()
  # Unparsing sets --verbosity to its default, WARNING; a fresh process logs INFO.
  absl_logging.set_verbosity(absl_logging.INFO)
  # ml_collections registers one flag per --config.<field> override at parse time.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)

  def run() -> None:
    if hasattr(module, "define_config_flag"):  # eval.py: --config depends on argv.
      if "config" in flags.FLAGS:
        delattr(flags.FLAGS, "config")
      module._CONFIG = module.define_config_flag(sys.argv)
    cli.run(module.main)

  saved = sys.argv
  sys.argv = [path, *args]
  try:
    return run_main(run)
  finally:
    sys.argv = saved


def run_main(main: Callable[[], object]) -> ScriptResult:
  """Calls an entry point's main in this process as its process would end: stdout and
  stderr (with absl's log lines) captured, SystemExit turned into the exit status."""
  from absl import logging as absl_logging

  stdout, stderr = io.StringIO(), io.StringIO()
  handler = absl_logging.get_absl_handler().python_handler
  saved = handler.stream
  handler.stream = stderr
  try:
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
      main()
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    if isinstance(e.code, str):  # What the interpreter does with sys.exit("message").
      stderr.write(e.code + "\n")
  finally:
    handler.stream = saved
  return ScriptResult(code, stderr.getvalue(), stdout.getvalue())


def run_train_in_process(config: str, workdir, *flags: str) -> ScriptResult:
  """train_command's run, by run_script in this process."""
  return run_script("train.py", *train_command(config, workdir, *flags)[2:])


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


class SimulatedCrash(BaseException):
  """Raised inside the trainer to end a run abruptly (no handler catches a BaseException)."""


@contextlib.contextmanager
def crash_after_logged_step(step: int):
  """The trainer in this process dies right after logging `step`, before that step's save:
  what a kill -9 there leaves, but torn writes (tests/test_resilience.py kills a real
  process for those). Resume tests of a method's own state need no second interpreter."""
  from vlp_jax import progress

  flush = progress.ProgressLog.flush

  def flush_then_crash(self, logged_step):
    logged = flush(self, logged_step)
    if logged_step >= step:
      raise SimulatedCrash(f"after step {logged_step}")
    return logged

  progress.ProgressLog.flush = flush_then_crash
  try:
    with contextlib.suppress(SimulatedCrash):
      yield
  finally:
    progress.ProgressLog.flush = flush


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
