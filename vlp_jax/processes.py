"""Child processes end with their parent, however the parent dies (even kill -9).

grain's data workers outlive a killed trainer: re-parented to init, each keeps its
memory (about 1 GB) and the shared-memory blocks it made. `exit_with_parent` is their
`worker_init_fn`; once a worker exits, the trainer's multiprocessing resource tracker
(whose pipe the workers held open) unlinks the shared memory they left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
  """grain `worker_init_fn` (called with the worker's index and count, unused): a
  daemon thread ends this process within PARENT_POLL_S of its parent's death.

  A watchdog, not prctl(PR_SET_PDEATHSIG): that signal comes when the *thread* that
  started the child ends, and grain starts its workers from prefetch threads that end
  whenever the iterator restarts (e.g. on a checkpoint restore).
  """
  del worker_index, worker_count
  parent = os.getppid()
  threading.Thread(
    target=_exit_when_orphaned, args=(parent,), name="exit-with-parent", daemon=True
  ).start()


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(PARENT_POLL_S)
  os._exit(1)  # No cleanup to run: the orphan's work is lost with its parent anyway.


def with_parent_death(command: Sequence[str]) -> list[str]:
  """`command`, run so that it gets SIGKILL when the calling process dies (on Linux;
  elsewhere it runs as is), e.g. a test's train.py when pytest is killed. Start it from a
  thread that outlives it (see exit_with_parent), e.g. the main thread.

  A small exec wrapper sets the signal, not a `preexec_fn`: that would run Python in a
  forked copy of a multithreaded process (JAX's), which can deadlock.
  """
  return [sys.executable, "-m", "vlp_jax.processes", str(os.getpid()), *command]


def _exec_with_parent_death(parent: int, command: list[str]) -> NoReturn:
  if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
  if os.getppid() != parent:  # It died before the prctl: follow it now.
    sys.exit(1)
  os.execvp(command[0], command)


if __name__ == "__main__":
  _exec_with_parent_death(int(sys.argv[1]), sys.argv[2:])
