"""The installed package (issue 36): `pip install .` offline (no dependencies, no build
isolation) into a directory of its own, then `python -m vlp_jax.train` run from another
directory trains a couple of steps of README's demo config, which only the installed
package holds (no checkout on the path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

# configs/demo.py at tests/configs/tiny.py's size, on the session's built-in dataset.
TINY = {
  "model.embed_dim": 32,
  "model.image.image_size": 32,
  "model.image.width": 32,
  "model.image.depth": 1,
  "model.image.num_heads": 2,
  "model.image.mlp_dim": 64,
  "model.text.width": 32,
  "model.text.depth": 1,
  "model.text.num_heads": 2,
  "model.text.mlp_dim": 64,
  "data.num_workers": 0,
  "data.builtin.num_train": 256,
  "data.builtin.num_heldout": 64,
  "data.builtin.image_size": 32,
  "optim.warmup_steps": 1,
  "log_every_steps": 1,
  "eval.tasks": "",  # Training is what the package must carry; eval.py has its tests.
}


def test_pip_install_then_train_from_another_directory(cache_dir, tmp_path):
  source = tmp_path / "source"  # A copy: the build writes build/ and egg-info beside it.
  shutil.copytree(
    Path(ROOT, "vlp_jax"), source / "vlp_jax", ignore=shutil.ignore_patterns("__pycache__")
  )
  shutil.copy(Path(ROOT, "pyproject.toml"), source)
  site = tmp_path / "site"
  pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
  pip += ["--no-index", "--quiet", "--target", str(site), str(source)]
  built = subprocess.run(pip, capture_output=True, text=True, timeout=300)
  assert built.returncode == 0, built.stderr[-3000:]
  assert (site / "vlp_jax/configs/demo.py").is_file()

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  workdir = tmp_path / "run"
  overrides = {**TINY, "data.cache_dir": cache_dir}
  command = [
    sys.executable,
    "-m",
    "vlp_jax.train",
    "--config=configs/demo.py:steps=2,batch_size=16",  # README's path, resolved by name.
    f"--workdir={workdir}",
    *(f"--config.{key}={value}" for key, value in overrides.items()),
  ]
  env = {**os.environ, "PYTHONPATH": str(site)}  # The installed copy and nothing else.
  run = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2]
  assert json.loads((workdir / "config.json").read_text())["model"]["image"]["width"] == 32
