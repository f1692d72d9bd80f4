"""Checkpoints: orbax manager, save and restore of state and data iterator, params from
other runs.

A checkpoint whose transformer blocks are in the other layout (unrolled resblocks_<i> vs
stacked for config.model.scan_layers) restores converted to the config's layout.

A restore tells a damaged checkpoint (unreadable: moved aside, the next older one tried)
from one another config wrote (other shapes or parameters: an error listing them, nothing
moved). A failed save (e.g. a full disk) stops the run with one line naming the directory
and its free space; the newest complete checkpoint stays restorable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vlp_jax.config_lib import ConfigError, UserError
from vlp_jax.models.stacking import has_stacked_blocks, stack_blocks, unstack_blocks

STATE_ITEM, DATA_ITEM = "state", "data"
_MAX_LISTED_DIFFERENCES = 8
# What to do about a run's own checkpoint that does not fit the config.
_RESUME_ADVICE = "use the config the run was started with (its config.json), or a new workdir"
# tensorstore reports a failed write as a ValueError carrying the errno in its text.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


class CheckpointError(UserError):
  """The run's checkpoints cannot be used or written; the message says what to do."""


class CheckpointMismatchError(CheckpointError, ConfigError):
  """A checkpoint was written with another config: other parameters, shapes or pipeline."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (e.g. a full disk)."""


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


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(manager.directory, str(step))


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else ""
  return f"{type(error).__name__}: {line[:limit]}"


def _saved_arrays(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """Path -> array metadata of the state saved at `step` (reads no arrays)."""
  metadata = ocp.StandardCheckpointHandler().metadata(
    epath.Path(_step_dir(manager, step)) / STATE_ITEM
  )
  return {"/".join(k): v for k, v in ocp.tree.to_flat_dict(metadata.tree).items()}


def _differences(saved: dict[str, Any], abstract_state: Any) -> list[str]:
  wanted = {"/".join(k): v for k, v in ocp.tree.to_flat_dict(abstract_state).items()}
  differences = []
  for key, leaf in wanted.items():  # In the state's order: parameters before optimizer.
    shape = tuple(leaf.shape)
    if key not in saved:
      differences.append(f"{key}: not in the checkpoint (config {shape})")
    elif tuple(saved[key].shape) != shape:
      differences.append(f"{key}: checkpoint {tuple(saved[key].shape)}, config {shape}")
  differences += [f"{key}: only in the checkpoint" for key in saved if key not in wanted]
  return differences


def _other_layout(abstract_state: Any) -> Any | None:
  """`abstract_state` with its transformer blocks in the other layout (scanned <->
  unrolled), or None when it has none that could be."""
  try:
    if has_stacked_blocks(abstract_state):
      return unstack_blocks(abstract_state)
    other = stack_blocks(abstract_state)
  except ValueError:  # Blocks of different shapes: never scanned.
    return None
  return other if has_stacked_blocks(other) else None


def _saved_layout(
  saved: dict[str, Any], abstract_state: Any, prefix: str = ""
) -> tuple[Any, list[str]]:
  """(`abstract_state` in the layout of the checkpoint's blocks, the differences of the
  arrays under `prefix` that remain): the config's layout unless only the other one fits."""
  differences = [d for d in _differences(saved, abstract_state) if d.startswith(prefix)]
  other = _other_layout(abstract_state) if differences else None
  if other is not None and not [d for d in _differences(saved, other) if d.startswith(prefix)]:
    return other, []
  return abstract_state, differences


def _convert_layout(tree: Any, abstract_tree: Any) -> Any:
  """`tree` (restored in the checkpoint's layout) in `abstract_tree`'s layout and
  shardings (one jitted copy)."""
  convert = stack_blocks if has_stacked_blocks(abstract_tree) else unstack_blocks
  leaves = jax.tree.leaves(abstract_tree)
  shardings = None
  if all(getattr(leaf, "sharding", None) is not None for leaf in leaves):
    shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_tree)
  converted = jax.jit(convert, out_shardings=shardings)(tree)
  if jax.tree.structure(converted) != jax.tree.structure(abstract_tree):
    raise CheckpointMismatchError(
      "the checkpoint's transformer blocks cannot be converted to this config's layout "
      "(config.model.scan_layers): use the value the run was started with"
    )
  return converted


def check_matches(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> list[str]:
  """How the state saved at `step` differs from `abstract_state` (what this config builds):
  one line per array whose shape differs or that only one of them has, [] when they match.
  Blocks saved in the other layout (config.model.scan_layers) match: restore converts them.

  Reads only the checkpoint's metadata (no arrays), so eval can report a mismatch before
  any compute. Raises whatever orbax raises when that metadata is unreadable (damaged).
  """
  return _saved_layout(_saved_arrays(manager, step), abstract_state)[1]


def require_match(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises a CheckpointMismatchError listing `check_matches`'s differences, if any."""
  if differences := check_matches(manager, step, abstract_state):
    raise _mismatch_error(manager, step, differences)


def _mismatch_error(
  manager: ocp.CheckpointManager, step: int, differences: list[str], advice: str = _RESUME_ADVICE
) -> CheckpointMismatchError:
  listed = differences[:_MAX_LISTED_DIFFERENCES]
  if len(differences) > len(listed):
    listed.append(f"and {len(differences) - len(listed)} more")
  return CheckpointMismatchError(
    f"checkpoint {_step_dir(manager, step)} was written with another model than this "
    f"config's ({len(differences)} arrays differ: {'; '.join(listed)}): {advice}"
  )


def restore_state(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: Any,
  data_iterator: grain.DatasetIterator | None = None,
) -> Any:
  """Restores the state (and the data iterator, in place) saved at `step`.

  Fields of a dataclass state that hold no arrays and that the checkpoint lacks (the
  empty `extra` of a method without extra state, in checkpoints written before
  TrainState had it) keep their empty values, so older runs still resume. Blocks saved
  in the other layout (unrolled vs config.model.scan_layers) are converted to the
  config's, parameters and optimizer moments alike.
  """
  target, _ = _saved_layout(_saved_arrays(manager, step), abstract_state)
  restored = _restore_exact(manager, step, target, data_iterator)
  if target is abstract_state:
    return restored
  logging.info(
    "Checkpoint %s holds its transformer blocks %s: converted to this config's layout",
    _step_dir(manager, step),
    "stacked (scanned)" if has_stacked_blocks(target) else "unrolled",
  )
  return _convert_layout(restored, abstract_state)


def _restore_exact(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: Any,
  data_iterator: grain.DatasetIterator | None,
) -> Any:
  absent = _absent_empty_fields(manager, step, abstract_state)
  target = abstract_state
  if absent:
    target = {
      f.name: getattr(abstract_state, f.name)
      for f in dataclasses.fields(abstract_state)
      if f.name not in absent
    }
  items = {STATE_ITEM: ocp.args.StandardRestore(target)}
  if data_iterator is not None:
    items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))[STATE_ITEM]
  return abstract_state.replace(**restored) if absent else restored


def _absent_empty_fields(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> set:
  if not dataclasses.is_dataclass(abstract_state):
    return set()
  empty = {
    f.name
    for f in dataclasses.fields(abstract_state)
    if not jax.tree.leaves(getattr(abstract_state, f.name))
  }
  if not empty:
    return set()
  metadata = ocp.StandardCheckpointHandler().metadata(
    epath.Path(_step_dir(manager, step)) / STATE_ITEM
  )
  saved = metadata.tree if isinstance(metadata.tree, dict) else {}
  return {name for name in empty if name not in saved}


def _move_aside(manager: ocp.CheckpointManager, step: int, error: BaseException) -> str:
  """Renames a damaged checkpoint to `<step>.damaged-<time>` (never deletes it), so the run
  can write that step again; returns the new path."""
  source = _step_dir(manager, step)
  target = f"{source}.damaged-{int(time.time())}"
  logging.warning("Checkpoint of step %d cannot be restored (%s).", step, _first_line(error))
  if jax.process_index() == 0:
    os.rename(source, target)
    logging.warning("Moved it aside to %s; to undo: mv %s %s", target, target, source)
  multihost_utils.sync_global_devices(f"vlp_jax: moved damaged checkpoint {step}")
  manager.reload()
  return target


def _is_damaged_data_state(error: BaseException) -> bool:
  """The data iterator's saved state is unreadable JSON (a torn file), as opposed to a
  readable state this pipeline cannot take (e.g. config.data.num_workers changed)."""
  while error is not None:
    if isinstance(error, json.JSONDecodeError):
      return True
    error = error.__cause__ or error.__context__
  return False


def restore_newest_good(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  data_iterator: grain.DatasetIterator | None = None,
) -> tuple[int, Any] | None:
  """(step, state) of the newest checkpoint that restores, or None when there is none.

  A checkpoint another model wrote (`check_matches` finds differences), or whose data
  iterator state this pipeline cannot take, raises a CheckpointMismatchError and moves
  nothing. A damaged one (files lost or truncated after it was written) is moved aside
  to `<step>.damaged-<time>`, logged with the command that undoes it, and the next older
  one is tried.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  moved = []
  for step in steps:
    try:
      differences = check_matches(manager, step, abstract_state)
    except Exception as e:  # orbax and tensorstore raise many error types for bad files
      moved.append(_move_aside(manager, step, e))
      continue
    if differences:
      raise _mismatch_error(manager, step, differences)
    try:
      state = restore_state(manager, step, abstract_state)
    except Exception as e:
      moved.append(_move_aside(manager, step, e))
      continue
    if data_iterator is not None:  # Separately: a pipeline change is no damage.
      try:
        data_args = grain.checkpoint.CheckpointRestore(data_iterator)
        manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: data_args}))
      except Exception as e:
        if not _is_damaged_data_state(e):
          raise CheckpointMismatchError(
            f"checkpoint {_step_dir(manager, step)}: this input pipeline cannot take its "
            f"data iterator state ({_first_line(e)}): {_RESUME_ADVICE} (config.data, e.g. "
            "data.num_workers, and the number of processes must stay)"
          ) from e
        moved.append(_move_aside(manager, step, e))
        continue
    return step, state
  if steps:
    raise CheckpointError(
      f"no checkpoint in {manager.directory} can be restored (steps {steps}); each was moved "
      f"aside ({', '.join(moved)}): remove them to start over, or rename one back to retry"
    )
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
    # Only the parameters need to fit, in either block layout (config.model.scan_layers).
    target, params_differ = _saved_layout(_saved_arrays(other, step), abstract_state, "params/")
    if params_differ:
      raise _mismatch_error(other, step, params_differ, "config.init_from needs the same model")
    params = restore_state(other, step, target).params
    return params if target is abstract_state else _convert_layout(params, abstract_state.params)


def save_checkpoint(
  manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: grain.DatasetIterator
) -> None:
  """Saves `state` and the data iterator's position as checkpoint `step`; the arrays are
  written in the background. A failed write (this one, or the previous background one,
  which orbax waits for first) raises a CheckpointWriteError."""
  args = ocp.args.Composite(
    **{
      STATE_ITEM: ocp.args.StandardSave(state),
      DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator),
    }
  )
  with _write_errors(manager):
    manager.save(step, args=args, force=True)


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises a CheckpointWriteError once a background save has failed, so the run stops at
  the next step rather than at the next save. Waits for nothing: call it every step."""
  if not manager.is_saving_in_progress():
    wait_for_saves(manager)


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Blocks until the background save is written; CheckpointWriteError if it failed."""
  with _write_errors(manager):
    manager.wait_until_finished()


def _os_errno(error: BaseException) -> int | None:
  """The errno of the OS error behind `error` (Python's or tensorstore's), if any."""
  while error is not None:
    if isinstance(error, OSError) and error.errno:
      return error.errno
    if match := _TENSORSTORE_ERRNO.search(str(error)):
      return int(match.group(1))
    error = error.__cause__ or error.__context__
  return None


def _format_bytes(num: float) -> str:
  units = ("B", "KiB", "MiB", "GiB", "TiB")
  power = 0
  while num >= 1024 and power < len(units) - 1:
    num /= 1024
    power += 1
  return f"{num:.1f} {units[power]}"


def _existing_parent(path: str) -> str:
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


@contextlib.contextmanager
def _write_errors(manager: ocp.CheckpointManager) -> Iterator[None]:
  """Turns an OS error of a checkpoint write into one CheckpointWriteError line."""
  try:
    yield
  except Exception as e:
    code = _os_errno(e)
    if code is None:
      raise
    directory = str(manager.directory)
    usage = shutil.disk_usage(_existing_parent(directory))
    latest = manager.latest_step()  # orbax has dropped the failed step already.
    kept = (
      f"the newest complete checkpoint, step {latest}, is intact"
      if latest is not None
      else "no checkpoint of this run is complete yet"
    )
    fix = "Fix that"
    if code in (errno.ENOSPC, errno.EDQUOT):
      fix = "Free some space"
      if unfinished := sorted(glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*"))):
        fix += f" (the unfinished {', '.join(unfinished)} can go)"
    raise CheckpointWriteError(
      f"cannot write a checkpoint to {directory}: {os.strerror(code)} "
      f"({_format_bytes(usage.free)} free of {_format_bytes(usage.total)}); {kept}. "
      f"{fix} and rerun to resume from it."
    ) from e
