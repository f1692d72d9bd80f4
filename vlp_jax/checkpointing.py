"""Checkpoints: orbax manager, restore of state and data iterator, params from other runs."""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

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
