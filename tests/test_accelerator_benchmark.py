"""benchmarks/accelerator.py end to end at its tiny size on CPU (what a device run does)."""

import json
import math
import os
import subprocess
import sys

from tests.conftest import ROOT, xla_flags


def test_tiny_run_writes_one_finite_row_per_model(tmp_path):
  out = tmp_path / "accelerator.json"
  env = dict(os.environ)
  # Two simulated devices: the data-parallel mesh splits the batch; no compilation cache,
  # so the compile time is a compile.
  env["XLA_FLAGS"] = xla_flags(2)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "benchmarks/accelerator.py"),
      "--tiny",
      "--models=clip",
      "--start_batch=4",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert result["platform"] == "cpu" and result["device_count"] == 2
  assert result["jax_version"] and result["date"]
  [row] = result["rows"]
  assert row["model"] == "clip" and row["devices"] == 2 and row["dtype"] == "float32"
  # The search compiled the start batch and chose a batch that fitted.
  assert row["batches_tried"][0]["per_device_batch"] == 4
  assert row["per_device_batch"] in [t["per_device_batch"] for t in row["batches_tried"]]
  assert row["step_s"] > 0 and len(row["step_times"]) == 3
  assert row["images_per_s_per_device"] == row["per_device_batch"] / row["step_s"]
  assert row["flops_per_step"] > 0 and row["peak_source"].startswith("measured f32 matmul")
  assert math.isfinite(row["mfu"]) and 0 < row["mfu"] <= 1
  assert row["compile_s"] > 0 and row["peak_memory_bytes"] > 0
  assert row["pipeline"]["batches_per_s"] > 0 and row["pipeline_headroom"] > 0
  # The table the command prints has the row.
  assert "| clip mu/8 32px | 4 (searched) |" in proc.stdout
