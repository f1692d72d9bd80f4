"""Progress reporting: one log line and TensorBoard scalars per logging interval."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from vlp_jax import flops, topology
from vlp_jax.input_pipeline import image_files


class Run(Protocol):
  """What the progress log reads of a run (an experiment.Experiment)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  local_batch_size: int
  total_steps: int


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return (
    f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    if seconds >= 3600
    else f"{seconds // 60}m{seconds % 60:02d}s"
  )


def create_metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard scalars from process 0; the log gets our own compact lines instead."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.SummaryWriter(workdir)


def write_json(path: str, payload: dict) -> None:
  if jax.process_index() == 0:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, "metrics.jsonl")


def truncate_metrics(workdir: str, step: int) -> int:
  """Drops the lines of <workdir>/metrics.jsonl past `step` (the step a run resumes from:
  the steps after it run again and log again) and a torn last line; returns how many.

  Process 0 only, like the writes. The file is replaced atomically.
  """
  path = metrics_path(workdir)
  if jax.process_index() > 0 or not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        keep = line.endswith("\n") and json.loads(line)["step"] <= step
      except (ValueError, KeyError, TypeError):  # Torn by a kill mid-write.
        keep = False
      if keep:
        kept.append(line)
      else:
        dropped += 1
  if dropped:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
    logging.info("Dropped %d lines of %s past step %d (they run again).", dropped, path, step)
  return dropped


# Peak dense bf16 FLOP/s per device_kind prefix: topology.CHIPS (sources beside it).
PEAK_FLOPS_PER_DEVICE = {kind: chip.peak_flops for kind, chip in topology.CHIPS.items()}


def peak_flops_per_device(device: Any, configured: float = 0.0) -> float | None:
  """`config.peak_flops_per_device` if set, else the chip table's figure for `device` (a
  jax device, whose share of a chip counts: a v3 core is half a chip, or a device_kind
  string, taken as a whole chip); None when unknown."""
  if configured > 0:
    return configured
  figures = topology.chip_for(device)
  return figures.peak_flops if figures else None


def compiled_flops(compiled: Any, num_devices: int) -> float | None:
  """XLA's cost-analysis FLOPs of one call of a compiled SPMD program over `num_devices`,
  all together. It counts a loop body once: with scanned layers use `step_flops`."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) * num_devices if flops else None


def step_flops(traced: jax.stages.Traced) -> float:
  """FLOPs of one call of a traced step (`jax.jit(f).trace(...)`), all devices together,
  counted from its jaxpr: scanned layers count depth times (flops.count_flops), and
  rematerialised work counts too, so the MFU is of the work the hardware does."""
  return flops.count_flops(traced.jaxpr)


def model_flops_utilization(
  flops_per_step: float, seconds_per_step: float, peak_per_device: float, num_devices: int
) -> float:
  """MFU = step FLOPs / (step seconds x devices x peak FLOP/s per device)."""
  return flops_per_step / (seconds_per_step * num_devices * peak_per_device)


class ProgressLog:
  """Turns the device metrics of the last steps into one log line and TensorBoard scalars."""

  def __init__(
    self,
    writer: metric_writers.MetricWriter,
    exp: Run,
    start_step: int,
    flops_per_step: float | None = None,
  ):
    self.writer = writer
    self.exp = exp
    device = exp.mesh.devices.flat[0]  # The mesh's: its share of a chip counts.
    peak = peak_flops_per_device(device, exp.config.peak_flops_per_device)
    self.flops_per_step = flops_per_step
    self.peak_flops = peak if flops_per_step else None
    self.last_step, self.last_time = start_step, time.time()
    self.pending: list[dict[str, jax.Array]] = []
    self.records_seen = 0
    self.records_skipped = 0
    self.paused = 0.0  # Seconds spent outside training steps (evaluation) since last flush.

  def add(self, metrics: dict[str, jax.Array], skipped: int) -> None:
    self.pending.append(metrics)
    self.records_seen += self.exp.local_batch_size + skipped
    self.records_skipped += skipped

  def flush(self, step: int) -> dict[str, float]:
    fetched = jax.device_get(self.pending)  # The one host sync per logging interval.
    self.pending = []
    metrics = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    for key in ("nonfinite_streak", "nonfinite_total"):
      metrics[key] = float(fetched[-1][key])
    now = time.time()
    steps_per_s = (step - self.last_step) / max(now - self.last_time - self.paused, 1e-9)
    self.last_step, self.last_time, self.paused = step, now, 0.0
    examples_per_s = steps_per_s * self.exp.config.batch_size
    metrics["examples_per_sec"] = examples_per_s
    metrics["examples_per_sec_per_device"] = examples_per_s / jax.device_count()
    metrics["data/skipped"] = float(self.records_skipped)
    if self.peak_flops:
      metrics["perf/mfu"] = model_flops_utilization(
        self.flops_per_step, 1 / max(steps_per_s, 1e-9), self.peak_flops, self.exp.mesh.size
      )
    self.writer.write_scalars(step, metrics)
    if jax.process_index() == 0:
      with open(metrics_path(self.exp.workdir), "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    eta = (self.exp.total_steps - step) / max(steps_per_s, 1e-9)
    logging.info(
      "step %d/%d | loss %.4f | lr %.2e | %.0f ex/s | ETA %s",
      step,
      self.exp.total_steps,
      metrics["loss"],
      metrics["learning_rate"],
      examples_per_s,
      _format_duration(eta),
    )
    return metrics

  def check_health(
    self,
    config: ml_collections.ConfigDict,
    metrics: dict[str, float],
    saved_step: int | None = None,
  ) -> None:
    """Raises when the run should stop (non-finite losses, too many skipped records);
    `saved_step`: the checkpoint just saved, which the message names."""
    kept = f" The checkpoint of step {saved_step} is saved." if saved_step is not None else ""
    if metrics["nonfinite_streak"] >= config.max_nonfinite_streak:
      raise FloatingPointError(
        f"{int(metrics['nonfinite_streak'])} non-finite losses in a row "
        f"(config.max_nonfinite_streak={config.max_nonfinite_streak}); updates were skipped. "
        f"Lower config.optim.lr or check the data.{kept}"
      )
    fraction = self.records_skipped / max(self.records_seen, 1)
    if self.records_skipped and fraction > config.data.max_skipped_fraction:
      listed = os.path.join(self.exp.workdir, image_files.SKIP_LIST_FILE)
      which = (
        f"every unreadable file is listed in {listed}"
        if os.path.isfile(listed)
        else "see the warnings above for which"
      )
      raise RuntimeError(
        f"{self.records_skipped} of {self.records_seen} records were corrupt and skipped "
        f"({fraction:.1%} > config.data.max_skipped_fraction="
        f"{config.data.max_skipped_fraction}); {which}.{kept}"
      )
