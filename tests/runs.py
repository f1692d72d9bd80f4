"""Running training as a user would (train.py in a subprocess) and reading what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


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


def first_batches(exp, num: int) -> list[dict]:
  """The first `num` training batches of an experiment, model inputs only."""
  from vlp_jax import trainer

  iterator = iter(exp.train_dataset())
  return [{k: b[k] for k in trainer.MODEL_INPUTS} for b in (next(iterator) for _ in range(num))]
