"""Crashes, preemption and damaged checkpoints: the run goes on, exactly, from its last
good checkpoint."""

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests.conftest import ROOT
from tests.runs import (
  logged_losses,
  run_train_in_process,
  train_command,
  wait_for_logged_step,
)
from vlp_jax import checkpointing


def _start_and_signal(command, workdir, at_step: int, signum: int) -> subprocess.Popen:
  """Starts train.py and sends `signum` once it has logged step `at_step`. Its stderr goes
  to <workdir>.stderr (a pipe nobody drains would block a chatty run): `_stderr(process)`."""
  log_path = f"{workdir}.stderr"
  with open(log_path, "w") as log:  # The child keeps its own descriptor.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
  process.log_path = log_path
  wait_for_logged_step(process, workdir, at_step, lambda: _stderr(process))
  process.send_signal(signum)
  return process


def _stderr(process: subprocess.Popen) -> str:
  return Path(process.log_path).read_text()


def test_kill_9_at_a_random_step_then_resume_gives_the_identical_run(tmp_path, cache_dir):
  config = f"tests/configs/tiny.py:cache_dir={cache_dir},steps=20"
  flags = ("--config.data.num_workers=1",)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  # Only the killed run needs a process of its own; the others run in this one.
  result = run_train_in_process(config, straight, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  kill_step = random.randint(3, 8)
  killed = _start_and_signal(train_command(config, resumed, *flags), resumed, kill_step, 9)
  assert killed.wait(timeout=60) == -signal.SIGKILL
  died_at = len(logged_losses(resumed))
  assert died_at < 20, f"the run finished before the kill at step {kill_step}"
  # Checkpoints are written in the background: the kill may have cut one short.
  with ocp.CheckpointManager(resumed / "checkpoints") as manager:
    complete = manager.all_steps()
  result = run_train_in_process(config, resumed, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  if complete:
    assert f"Resuming from the checkpoint of step {max(complete)}" in result.stderr
  else:
    assert "Resuming" not in result.stderr
  assert logged_losses(resumed) == logged_losses(straight), f"killed at step {died_at}"
  steps = [
    json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
  ]
  assert steps == list(range(1, 21))  # The lines of the re-run steps went at the resume.
  checkpointer = ocp.StandardCheckpointer()
  final = [checkpointer.restore(d / "checkpoints" / "20" / "state") for d in (straight, resumed)]
  jax.tree.map(np.testing.assert_array_equal, final[0]["params"], final[1]["params"])


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
  config = f"tests/configs/tiny.py:cache_dir={cache_dir},steps=500"
  # No periodic checkpoints: the only one must come from the SIGTERM.
  flags = (
    "--config.checkpoint_every_steps=1000",
    "--config.data.num_workers=0",
    "--config.peak_flops_per_device=1e12",  # CPUs have no table entry: give one for MFU.
    "--config.profile_first_step=1",
    "--config.profile_num_steps=1",
  )
  process = _start_and_signal(train_command(config, tmp_path, *flags), tmp_path, 2, signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  stderr = _stderr(process)
  assert "Preempted: saved the checkpoint of step" in stderr
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    assert manager.all_steps() == [len(logged_losses(tmp_path))]
  assert len(logged_losses(tmp_path)) < 500
  entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(0 < e["perf/mfu"] < 1 for e in entries)
  assert list((tmp_path / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, tiny_config):
  state = {"w": np.arange(6.0), "b": np.float32(1.0)}
  manager = checkpointing.create_checkpoint_manager(str(tmp_path), tiny_config)
  for step in (2, 4):
    saved = {k: v * step for k, v in state.items()}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved)))
  manager.wait_until_finished()
  for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
    for name in files:  # Truncate every data file of the newest checkpoint.
      open(os.path.join(root, name), "wb").close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  step, restored = checkpointing.restore_newest_good(manager, abstract)
  assert step == 2
  np.testing.assert_array_equal(restored["w"], state["w"] * 2)
  assert manager.all_steps() == [2]  # Step 4 was moved aside, not deleted:
  assert any(p.startswith("4.damaged") for p in os.listdir(tmp_path / "checkpoints"))
