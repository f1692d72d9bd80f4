"""Checkpoints: orbax manager, restore of state and data iterator, params from other runs."""

from __future__ import annotations

import os
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax.config_lib import ConfigError


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


def create_checkpoint_manager(
  workdir: str, config: ml_collections.ConfigDict
) -> ocp.CheckpointManager:
  # Orbax writes each checkpoint to a temporary directory and renames it when complete,
  # so a crash mid-save never damages the last good checkpoint.
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      create=True,
    ),
  )


def restore_state(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: Any,
  data_iterator: grain.DatasetIterator | None = None,
) -> Any:
  """Restores the state (and the data iterator, in place) saved at `step`."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_newest_good(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  data_iterator: grain.DatasetIterator | None = None,
) -> tuple[int, Any] | None:
  """(step, state) of the newest checkpoint that restores, or None when there is none.

  A damaged newest checkpoint (files lost or truncated after it was written) is skipped
  with a warning and moved aside to `<step>.damaged`, never deleted, so the run can
  write that step again.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      return step, restore_state(manager, step, abstract_state, data_iterator)
    except Exception as e:  # orbax and tensorstore raise many error types for bad files
      logging.warning(
        "Checkpoint of step %d cannot be restored (%s); trying an older one.", step, e
      )
      if jax.process_index() == 0:
        damaged = os.path.join(manager.directory, str(step))
        os.rename(damaged, f"{damaged}.damaged-{int(time.time())}")
      multihost_utils.sync_global_devices(f"vlp_jax: moved damaged checkpoint {step}")
      manager.reload()
  if steps:
    raise RuntimeError(f"no checkpoint in {manager.directory} can be restored (steps {steps})")
  return None


def load_params(run_or_checkpoints: str, abstract_state: Any) -> Any:
  """Parameters of the newest checkpoint of another run (its workdir or checkpoints dir)."""
  directory = os.path.join(run_or_checkpoints, "checkpoints")
  if not os.path.isdir(directory):
    directory = run_or_checkpoints
  with ocp.CheckpointManager(os.path.abspath(directory)) as other:
    step = other.latest_step()
    if step is None:
      raise ConfigError(f"config.init_from: no checkpoint in {directory!r}")
    return restore_state(other, step, abstract_state).params
