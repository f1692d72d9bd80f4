"""Preemption: SIGTERM asks the training loop to checkpoint at the next step boundary,
and an evaluation in progress to stop at its next batch (`check_stop`).

One process: a SIGTERM handler sets a flag. Several processes (jax.distributed): JAX's
preemption service spreads the notice to every host and agrees on a step where all of
them stop together (`reached_preemption_sync_point`), so no host waits forever in a
collective for one that already left.
"""

from __future__ import annotations

import signal
import threading
import types

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """A SIGTERM stopped an evaluation between two batches (`check_stop`)."""


# The watcher of the training loop now running, whose flag evaluation loops read.
_active: PreemptionWatcher | None = None


def check_stop() -> None:
  """Raises Preempted once SIGTERM has asked this process to stop; evaluation loops call
  it between batches, so the end-of-run evaluation stops within a batch, not minutes.
  One process only: several must stop together, at a step boundary."""
  watcher = _active
  if watcher is not None and not watcher._multihost and watcher._signalled.is_set():
    raise Preempted("SIGTERM during evaluation")


class PreemptionWatcher:
  """Context manager; `should_stop(step)` is True once every process should save and exit."""

  def __init__(self) -> None:
    self._signalled = threading.Event()
    self._previous = None
    self._multihost = jax.distributed.is_initialized()

  def _on_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting.")
    self._signalled.set()

  def __enter__(self) -> PreemptionWatcher:
    # Signal handlers can only be set from the main thread (not, e.g., in a notebook
    # worker thread); there the loop simply runs without one.
    global _active
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    _active = self
    return self

  def __exit__(self, *exc_info: object) -> None:
    global _active
    if _active is self:
      _active = None
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()
