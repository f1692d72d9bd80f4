"""Shared setup for the command-line entry points."""

from __future__ import annotations

import logging as py_logging
import os

import jax
from absl import flags, logging

_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0, to launch several processes by hand (e.g. two on one machine); "
  "TPU pods, SLURM and Open MPI jobs are detected without it.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")

# Environment variables that mark a multi-process launch jax.distributed detects by itself.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

# Libraries whose INFO records drown the training log (orbax logs every file it writes).
_CHATTY_LIBRARIES = (
  f"{os.sep}orbax{os.sep}",
  f"{os.sep}grain{os.sep}",
  f"{os.sep}jax{os.sep}_src{os.sep}",
)


class _DropLibraryInfo(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def log_to_absl_at_info() -> None:
  """absl logging at INFO for an argparse entry point (the converters)."""
  flags.FLAGS.mark_as_parsed()  # absl's logging waits for parsed flags; ours are argparse's.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)


def quiet_library_logs() -> None:
  """Keeps our INFO lines and the libraries' warnings; drops the libraries' INFO chatter."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


def _launched_on_a_cluster() -> bool:
  if any(int(os.environ.get(v, "1")) > 1 for v in _CLUSTER_SIZE_VARIABLES):
    return True
  # A TPU pod slice lists one hostname per worker; a single TPU VM lists one.
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed() -> None:
  """jax.distributed.initialize() for multi-process launches; nothing for one process."""
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    # CPU-only processes need a collectives backend to talk to each other (tests, debugging).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _launched_on_a_cluster():
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d", jax.process_index(), jax.process_count())
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # Progress is logged once, by process 0.
