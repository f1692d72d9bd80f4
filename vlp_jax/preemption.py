"""Preemption: SIGTERM asks the training loop to checkpoint at the next step boundary.

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
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info: object) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()
