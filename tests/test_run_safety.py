"""No run lost, no machine exhausted: config ranges, checkpoints of another config, full
disks, one writer per workdir, data workers that die with the trainer, user errors as one
line."""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from grain._src.python.checkpoint import handler as grain_handler
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler

from tests.conftest import ROOT
from tests.runs import (
  ScriptResult,
  logged_losses,
  run_train_in_process,
  train_command,
  wait_for_logged_step,
)
from vlp_jax import checkpointing, config_lib, processes, progress, workdir_lock
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import common
from vlp_jax.methods import METHODS


# Every process a test starts ends with pytest, however pytest ends.
def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
  command = processes.with_parent_death([sys.executable, "-c", code, *args])
  return subprocess.Popen(command, cwd=ROOT, text=True, **kwargs)


def _run(command: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(
    processes.with_parent_death(command), capture_output=True, text=True, cwd=ROOT, timeout=600
  )


# --- Config rules -------------------------------------------------------------------------


def _fields(config: ml_collections.ConfigDict, prefix: str = ""):
  """(dotted key, declared type) of every leaf field."""
  for key in config:
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", config.get_type(key)  # Declared: also of a None default.


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_numeric_field_has_a_rule_and_every_rule_a_field(method):
  # The base config's fields and rules, and those of the method's own blocks.
  fields = dict(_fields(common.base_config(method)))
  rules = common.config_rules(method)
  numeric = {k for k, t in fields.items() if t in (int, float, tuple)}
  assert sorted(numeric - set(rules)) == [], "numeric fields without a rule"
  assert sorted(set(rules) - set(fields)) == [], "rules naming no field"


def test_every_shipped_config_passes_the_rules(cache_dir):
  names = config_lib.packaged_recipes()
  assert "demo" in names and "cluster_vitb16" in names
  for name in names:
    config = importlib.import_module(f"vlp_jax.configs.{name}").get_config()
    config_lib.check_rules(config, common.config_rules(config.method))
  from tests.configs import tiny

  config_lib.check_rules(tiny.get_config(f"cache_dir={cache_dir}"), common.RULES)


@pytest.mark.parametrize(
  ("key", "value", "rule"),
  [
    ("optim.lr", 0.0, "> 0"),
    ("optim.lr", -1e-3, "> 0"),
    ("optim.lr", float("nan"), "> 0"),
    ("keep_checkpoints", 0, ">= 1"),
    ("checkpoint_every_steps", 0, ">= 1"),
    ("log_every_steps", 0, ">= 1"),
    ("eval.every_steps", -1, ">= 0"),
    ("masking.ratio", 1.0, r"in \[0, 1\)"),
    ("data.crop_scale", (0.9, 0.5), "0 < low <= high <= 1"),
    ("mesh.data", 0, "-1 or >= 1"),
    ("eval.recall_ks", (), "non-empty"),
    ("model.image.mean", (0.5, 0.5), "3 values"),
  ],
)
def test_an_out_of_range_value_fails_naming_key_value_and_rule(key, value, rule):
  config = common.base_config()
  *parents, name = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value
  with pytest.raises(ConfigError, match=rf"config\.{key}=.*: must be .*{rule}"):
    config_lib.check_rules(config, common.RULES)


def test_zero_means_never_or_derived_where_the_rules_allow_it():
  config = common.base_config()
  for key in ("eval", "masking"):
    config[key]["every_steps" if key == "eval" else "show_every_steps"] = 0
  config.profile_first_step = config.stop_after_steps = config.total_steps = 0
  config.data.num_workers = 0
  config.model.image.width = None  # None: the variant's.
  config_lib.check_rules(config, common.RULES)


# --- Checkpoints: another config's, damaged, and full disks --------------------------------


def _state(width: int, scale: float = 1.0) -> dict:
  return {
    "params": {"w": np.full((3, width), scale, np.float32), "b": np.zeros(width, np.float32)},
    "step": np.int32(0),
  }


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _manager(workdir) -> ocp.CheckpointManager:
  config = ml_collections.ConfigDict({"keep_checkpoints": 3})
  return checkpointing.create_checkpoint_manager(str(workdir), config)


def _save(manager, step: int, state, iterator=None) -> None:
  iterator = iterator or iter(grain.MapDataset.range(100).to_iter_dataset())
  checkpointing.save_checkpoint(manager, step, state, iterator)
  checkpointing.wait_for_saves(manager)


def test_a_checkpoint_of_another_model_fails_listing_the_shapes_and_moves_nothing(tmp_path):
  manager = _manager(tmp_path)
  _save(manager, 2, _state(4))
  _save(manager, 4, _state(4))
  other = _abstract(_state(8))
  assert checkpointing.check_matches(manager, 4, other) == [
    "params/b: checkpoint (4,), config (8,)",
    "params/w: checkpoint (3, 4), config (3, 8)",
  ]
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"params/w: checkpoint \(3, 4\)"):
    checkpointing.restore_newest_good(manager, other)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="2 arrays differ"):
    checkpointing.require_match(manager, 2, other)
  deeper = _abstract({**_state(4), "extra": np.zeros(2)})
  assert checkpointing.check_matches(manager, 4, deeper) == [
    "extra: not in the checkpoint (config (2,))"
  ]
  shallower = _abstract({"step": np.int32(0), "params": {"w": np.zeros((3, 4), np.float32)}})
  assert checkpointing.check_matches(manager, 4, shallower) == ["params/b: only in the checkpoint"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  step, state = checkpointing.restore_newest_good(_manager(tmp_path), _abstract(_state(4)))
  assert step == 4 and state["params"]["w"].shape == (3, 4)


def test_init_from_a_run_of_another_model_fails_listing_the_shapes(tmp_path):
  _save(_manager(tmp_path), 2, _state(4))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="init_from needs the same"):
    checkpointing.load_params(str(tmp_path), _abstract(_state(8)))


def test_a_data_iterator_state_of_another_pipeline_fails_and_moves_nothing(tmp_path):
  manager = _manager(tmp_path)
  _save(manager, 2, _state(4))
  ranges = [grain.MapDataset.range(5).to_iter_dataset() for _ in range(2)]
  other_pipeline = iter(grain.experimental.InterleaveIterDataset(ranges, cycle_length=2))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="data iterator state"):
    checkpointing.restore_newest_good(manager, _abstract(_state(4)), other_pipeline)
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


def _truncate_files(directory) -> None:
  for root, _, files in os.walk(directory):
    for name in files:
      open(os.path.join(root, name), "wb").close()


def test_a_damaged_checkpoint_is_moved_aside_with_the_command_that_undoes_it(tmp_path, caplog):
  manager = _manager(tmp_path)
  _save(manager, 2, _state(4, 2.0))
  _save(manager, 4, _state(4, 4.0))
  _truncate_files(tmp_path / "checkpoints" / "4" / "state")
  caplog.set_level("WARNING")
  step, state = checkpointing.restore_newest_good(manager, _abstract(_state(4)))
  assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0
  (moved,) = [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith("4.damaged-")]
  source, target = tmp_path / "checkpoints" / "4", tmp_path / "checkpoints" / moved
  assert f"mv {target} {source}" in caplog.text
  _truncate_files(tmp_path / "checkpoints" / "2" / "state")  # Now none restores:
  with pytest.raises(checkpointing.CheckpointError, match=r"steps \[2\]\); each was moved"):
    checkpointing.restore_newest_good(_manager(tmp_path), _abstract(_state(4)))


def _full_disk(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoints/4.orbax-checkpoint-tmp")


async def _full_disk_in_the_background(*args, **kwargs):
  # What tensorstore raises: a ValueError carrying the errno.
  raise ValueError(
    "RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']"
  )


def test_a_full_disk_stops_the_save_with_one_line_and_keeps_the_last_checkpoint(
  tmp_path, monkeypatch
):
  manager = _manager(tmp_path)
  _save(manager, 2, _state(4, 2.0))
  monkeypatch.setattr(grain_handler.CheckpointHandler, "save", _full_disk)
  with pytest.raises(checkpointing.CheckpointWriteError) as raised:
    checkpointing.save_checkpoint(
      manager, 4, _state(4, 4.0), iter(grain.MapDataset.range(9).to_iter_dataset())
    )
  message = str(raised.value)
  assert "\n" not in message and str(tmp_path / "checkpoints") in message
  assert "No space left on device" in message and " free of " in message and "step 2" in message
  monkeypatch.undo()
  step, state = checkpointing.restore_newest_good(_manager(tmp_path), _abstract(_state(4)))
  assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0


def test_a_failed_background_write_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
  manager = _manager(tmp_path)
  _save(manager, 2, _state(4, 2.0))
  handler = base_pytree_checkpoint_handler.BasePyTreeCheckpointHandler
  monkeypatch.setattr(handler, "_write_metadata_file", _full_disk_in_the_background)
  # Returns at once: the arrays are written in the background.
  checkpointing.save_checkpoint(
    manager, 4, _state(4, 4.0), iter(grain.MapDataset.range(9).to_iter_dataset())
  )
  deadline = time.time() + 120
  with pytest.raises(checkpointing.CheckpointWriteError, match="No space left on device"):
    while time.time() < deadline:  # What the loop does every step.
      checkpointing.check_saves(manager)
      time.sleep(0.05)
  checkpointing.wait_for_saves(manager)  # Raised once: the run's final wait does not again.
  monkeypatch.undo()
  step, state = checkpointing.restore_newest_good(_manager(tmp_path), _abstract(_state(4)))
  assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0


# --- metrics.jsonl after a resume ----------------------------------------------------------


def test_truncate_metrics_drops_the_steps_that_run_again_and_a_torn_line(tmp_path):
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)]
  (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 7, "lo')
  assert progress.truncate_metrics(str(tmp_path), 4) == 3
  assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:4])
  assert progress.truncate_metrics(str(tmp_path), 4) == 0
  assert progress.truncate_metrics(str(tmp_path / "none"), 4) == 0  # No file yet: nothing.


# --- The workdir lock ----------------------------------------------------------------------

_HOLD = """
import sys
from vlp_jax import workdir_lock
try:
  with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # Until the test closes our stdin.
except workdir_lock.WorkdirLockedError as e:
  print(e, flush=True)
  sys.exit(3)
"""


def test_a_second_process_on_a_held_workdir_is_refused_with_the_holders_pid(tmp_path):
  holder = _python(_HOLD, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == "held"
    second = _run([sys.executable, "-c", _HOLD, str(tmp_path)])
    assert second.returncode == 3, second.stderr[-2000:]
    assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in second.stdout
    assert str(tmp_path / ".lock") in second.stdout  # How to clear it if the holder is gone.
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
  finally:
    holder.kill()
    holder.wait()
  assert not (tmp_path / ".lock").exists()  # Released on exit.
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


_HOLD_IN_TWO_PROCESSES = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
# Short teardown timeouts: jax's exit barrier may wait on a peer that already left.
jax.distributed.initialize(
  sys.argv[2], num_processes=2, process_id=int(sys.argv[3]),
  heartbeat_timeout_seconds=20, shutdown_timeout_seconds=20,
)
from vlp_jax import workdir_lock
try:
  with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
except workdir_lock.WorkdirLockedError as e:
  print(e, flush=True)
  sys.exit(3)
"""


def test_every_process_of_a_refused_multi_process_run_stops(tmp_path):
  holder = _python(_HOLD, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  run = []
  try:
    assert holder.stdout.readline().strip() == "held"
    with socket.socket() as s:
      s.bind(("localhost", 0))
      address = f"localhost:{s.getsockname()[1]}"
    run = [
      _python(_HOLD_IN_TWO_PROCESSES, str(tmp_path), address, str(i), stdout=subprocess.PIPE)
      for i in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in run]
    # Each process reports the refusal and stops. The exit code is 3, unless jax's
    # teardown (not ours) aborted after the refusal was printed.
    assert all(process.returncode != 0 for process in run), outputs
    assert f"in use by pid {holder.pid}" in outputs[0]  # Only process 0 reads the lock.
    assert "in use (see process 0's error)" in outputs[1]
  finally:
    for process in [holder, *run]:
      process.kill()
      process.wait()


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _write_lock(workdir, pid: int, host: str, age_s: float = 0.0) -> None:
  path = Path(workdir, ".lock")
  path.write_text(json.dumps({"pid": pid, "host": host, "started": time.time() - age_s}))
  os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = _dead_pid()
  _write_lock(tmp_path, dead, socket.gethostname())
  caplog.set_level("WARNING")
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert f"stale lock {tmp_path / '.lock'} of pid {dead}" in caplog.text
  assert not (tmp_path / ".lock").exists()


def test_without_flock_a_live_pid_holds_and_a_dead_one_does_not(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "_try_flock", lambda fd: "unsupported")
  _write_lock(tmp_path, os.getppid(), socket.gethostname())
  refused = pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getppid()}")
  with refused, workdir_lock.hold(str(tmp_path)):
    pass
  _write_lock(tmp_path, _dead_pid(), socket.gethostname())
  with workdir_lock.hold(str(tmp_path)):
    pass


def test_another_hosts_lock_is_stale_only_once_it_stops_beating(tmp_path):
  # A free flock proves nothing about another host: some filesystems keep flocks per host.
  _write_lock(tmp_path, 1, "elsewhere")
  refused = pytest.raises(workdir_lock.WorkdirLockedError, match="on host elsewhere")
  with refused, workdir_lock.hold(str(tmp_path)):
    pass
  _write_lock(tmp_path, 1, "elsewhere", age_s=2 * workdir_lock.STALE_AFTER_S)
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["host"] == socket.gethostname()


# --- Worker processes die with their parent ------------------------------------------------

_PARENT_OF_A_WORKER = """
import subprocess, sys, time
from vlp_jax import processes
code = "from vlp_jax import processes; processes.exit_with_parent(0, 1); import time; time.sleep(600)"
command = [sys.executable, "-c", code]
worker = subprocess.Popen(processes.with_parent_death(command) if sys.argv[1:] else command)
print(worker.pid, flush=True)
time.sleep(600)
"""


def _process_table() -> dict[int, tuple[int, str]]:
  """pid -> (parent pid, state) of every process, from /proc."""
  table = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        stat = Path("/proc", entry, "stat").read_text()
      except OSError:
        continue
      state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]  # The name may hold spaces.
      table[int(entry)] = (int(ppid), state)
  return table


def _descendants(pid: int) -> set[int]:
  table, found, frontier = _process_table(), set(), {pid}
  while frontier:
    frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
    found |= frontier
  return found


def _alive(pids: set[int]) -> set[int]:
  table = _process_table()
  return {p for p in pids if p in table and table[p][1] != "Z"}  # A zombie has exited.


def _wait_until_gone(pids: set[int], timeout: float) -> set[int]:
  deadline = time.time() + timeout
  while (alive := _alive(pids)) and time.time() < deadline:
    time.sleep(0.1)
  return alive


def _kill(pids) -> None:
  for pid in pids:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["exit_with_parent", "with_parent_death"])
def test_a_child_ends_when_its_parent_is_killed(how):
  flags = ["--with_parent_death"] if how == "with_parent_death" else []
  parent = _python(_PARENT_OF_A_WORKER, *flags, stdout=subprocess.PIPE)
  worker = None
  try:
    worker = int(parent.stdout.readline())
    time.sleep(2 * processes.PARENT_POLL_S)  # The worker's watchdog has started.
    parent.kill()
    parent.wait()
    assert _wait_until_gone({worker}, timeout=10) == set()
  finally:
    parent.kill()
    parent.wait()
    if worker is not None:
      _kill(_alive({worker}))


# Makes the shared memory of every Python process started with the variable set (the
# trainer and its workers) findable by name.
_SITECUSTOMIZE = """
import os
if os.environ.get("VLP_TEST_SHM_PREFIX"):
  from multiprocessing import shared_memory
  shared_memory._SHM_NAME_PREFIX = os.environ["VLP_TEST_SHM_PREFIX"]
  shared_memory._SHM_SAFE_NAME_LENGTH = 64  # Room for the tag (Linux allows 255).
"""


def _tagging_shared_memory(tmp_path) -> tuple[dict, str]:
  """(environment, /dev/shm glob) for a train.py whose shared memory the test finds."""
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
  tag = f"psm_vlptest{os.getpid()}_{time.time_ns()}_"
  path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
  return {**os.environ, "PYTHONPATH": path, "VLP_TEST_SHM_PREFIX": f"/{tag}"}, f"{tag}*"


def _start_train_py(workdir, log, *flags: str, config: str, env=None) -> subprocess.Popen:
  with open(log, "w") as stderr:  # A file: a pipe nobody reads would stall the run.
    return subprocess.Popen(
      processes.with_parent_death(train_command(config, workdir, *flags)),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=stderr,
      env=env,
    )


def _wait_for_step(process: subprocess.Popen, workdir, log, step: int = 1) -> None:
  wait_for_logged_step(process, workdir, step, lambda: Path(log).read_text(), poll_s=0.1)


def test_kill_9_of_the_trainer_leaves_no_worker_process_or_shared_memory(tmp_path, cache_dir):
  config = f"tests/configs/tiny.py:cache_dir={cache_dir},steps=1000"
  env, shared_memory = _tagging_shared_memory(tmp_path)
  log = tmp_path / "train.log"
  flag = "--config.data.num_workers=1"
  trainer = _start_train_py(tmp_path / "run", log, flag, config=config, env=env)
  children: set[int] = set()
  try:
    _wait_for_step(trainer, tmp_path / "run", log)
    children = _descendants(trainer.pid)  # The worker, and the resource tracker.
    assert children, "no worker process to check"
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=60)
    survivors = _wait_until_gone(children, timeout=10)
    assert not survivors, [Path("/proc", str(p), "cmdline").read_bytes() for p in survivors]
    assert sorted(Path("/dev/shm").glob(shared_memory)) == []
  finally:
    trainer.kill()
    trainer.wait()
    _kill(_alive(children))
    for leftover in Path("/dev/shm").glob(shared_memory):
      leftover.unlink()


# --- train.py: user errors as one line (several need the trainer's wiring) -----------------

TINY = "tests/configs/tiny.py"


def _train_py(workdir, *flags: str, cache_dir: str, steps: int = 4) -> ScriptResult:
  """train.py's flag parsing, error reporting and training, run in this process."""
  return run_train_in_process(f"{TINY}:cache_dir={cache_dir},steps={steps}", workdir, *flags)


def _one_error_line(result: ScriptResult) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
  return line


@pytest.mark.parametrize(
  ("flag", "message"),
  [
    ("--config.optim.lrr=1", "error: --config.optim.lrr=1: the config has no field 'lrr'"),
    ("--config.optim.lr=abc", "error: flag --config.optim.lr=abc: could not convert"),
  ],
)
def test_a_bad_flag_prints_one_line_naming_it(tmp_path, cache_dir, flag, message):
  line = _one_error_line(_train_py(tmp_path, flag, cache_dir=cache_dir))
  assert line.startswith(message)
  assert not (tmp_path / "checkpoints").exists()


def test_a_user_error_prints_one_line_and_verbose_the_traceback(tmp_path, cache_dir):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  line = _one_error_line(_train_py(blocker / "run", cache_dir=cache_dir))
  assert "a_file/run" in line and "not writable" in line
  with pytest.raises(config_lib.UserError, match="not writable"):  # Its traceback is kept.
    _train_py(blocker / "run", "--verbose", cache_dir=cache_dir)


# Needs config_lib.check_rules(config, RULES) at the top of create_experiment.
@pytest.mark.parametrize(
  ("flag", "message"),
  [
    ("--config.optim.lr=0", "config.optim.lr=0.0: must be > 0"),
    ("--config.checkpoint_every_steps=0", "config.checkpoint_every_steps=0: must be >= 1"),
    ("--config.keep_checkpoints=0", "config.keep_checkpoints=0: must be >= 1"),
  ],
)
def test_an_out_of_range_value_stops_train_py_before_compiling(tmp_path, cache_dir, flag, message):
  assert _one_error_line(_train_py(tmp_path, flag, cache_dir=cache_dir)) == f"error: {message}"
  assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir) -> Path:
  """A finished 4-step tiny run: checkpoints 2 and 4, metrics of steps 1-4."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = _train_py(workdir, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _copy(run: Path, tmp_path) -> Path:
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  return copy


def test_resuming_with_another_model_fails_listing_the_shapes_and_keeps_the_checkpoints(
  trained_run, tmp_path, cache_dir
):
  workdir = _copy(trained_run, tmp_path)
  config_json = (workdir / "config.json").read_text()
  line = _one_error_line(_train_py(workdir, "--config.model.image.width=64", cache_dir=cache_dir))
  assert "was written with another model" in line
  assert "params/visual/conv1/kernel: checkpoint (8, 8, 3, 32), config (8, 8, 3, 64)" in line
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # Nothing moved.
  # Needs config.json written after the restore: it still tells the run's config.
  assert (workdir / "config.json").read_text() == config_json


def test_a_resume_drops_the_metrics_of_the_steps_that_run_again(trained_run, tmp_path, cache_dir):
  # Needs progress.truncate_metrics(workdir, restored step) after the restore.
  workdir = _copy(trained_run, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "4")  # As if killed before step 4's save.
  result = _train_py(workdir, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from the checkpoint of step 2" in result.stderr
  steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]


def test_a_full_disk_stops_training_at_once_with_one_line(tmp_path, cache_dir, monkeypatch):
  # Needs checkpointing.save_checkpoint in the loop (and check_saves / wait_for_saves).
  save = grain_handler.CheckpointHandler.save

  def full_disk_at_step_4(self, directory, *args, **kwargs):
    if os.path.basename(os.path.dirname(str(directory))).startswith("4."):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return save(self, directory, *args, **kwargs)

  monkeypatch.setattr(grain_handler.CheckpointHandler, "save", full_disk_at_step_4)
  line = _one_error_line(_train_py(tmp_path, cache_dir=cache_dir, steps=8))
  assert "No space left on device" in line and "step 2" in line and " free of " in line
  assert len(logged_losses(tmp_path)) == 4  # No step after the failed save.
  complete = [p for p in os.listdir(tmp_path / "checkpoints") if not p.endswith("-tmp")]
  assert complete == ["2"]
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")
  assert int(restored["step"]) == 2


def test_a_second_trainer_on_a_workdir_is_refused_naming_the_first(tmp_path, cache_dir):
  # Needs `with workdir_lock.hold(workdir):` around train_and_evaluate's work.
  config = f"{TINY}:cache_dir={cache_dir},steps=1000"
  log = tmp_path / "first.log"
  first = _start_train_py(tmp_path / "run", log, config=config)
  try:
    _wait_for_step(first, tmp_path / "run", log)
    # (Refused before training; were it not, it would stop after a step.)
    second = _train_py(tmp_path / "run", "--config.stop_after_steps=1", cache_dir=cache_dir)
    line = _one_error_line(second)
    assert f"in use by pid {first.pid} on host {socket.gethostname()}" in line
    assert first.poll() is None  # The first one trains on.
  finally:
    first.kill()
    first.wait()
