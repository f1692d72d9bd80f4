"""One writer per workdir: a lock file, <workdir>/.lock, held while a run trains.

Two trainers on one workdir would write the same checkpoint steps and interleave
metrics.jsonl. The lock file is created atomically (O_CREAT | O_EXCL) and holds the
holder's pid, host and start time (JSON); the holder also keeps an flock on it (released
by the kernel however the process dies) and touches it every HEARTBEAT_S seconds.

A lock is stale, and taken over with a warning, when its holder is gone:
  * same host: its flock is free, or its pid is dead;
  * other host: its flock is free and it has not been touched for STALE_AFTER_S (a
    filesystem may keep flocks per host, so a free flock alone proves nothing there);
  * no flock support: a dead pid (same host) or no touch for STALE_AFTER_S (other host).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax.config_lib import UserError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# errnos of a filesystem without flock (e.g. some network filesystems).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(UserError):
  """Another live process holds the workdir."""


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_NAME)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds <workdir>/.lock for the block; raises WorkdirLockedError naming the holder
  (pid, host, start time) when another live process has it.

  Every process of a run calls it; only process 0 takes the lock (the processes of one
  run write together, the lock keeps other runs out) and tells the others if it failed.
  """
  lock, refusal = None, None
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    lock = _Lock(lock_path(workdir))
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      lock, refusal = None, e
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
    if refused and refusal is None:
      refusal = WorkdirLockedError(f"workdir {workdir} is in use (see process 0's error)")
  if refusal is not None:
    raise refusal
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _pid_alive(pid: Any) -> bool:
  if not isinstance(pid, int) or pid <= 0:  # 0 and -1 would ask about process groups.
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return "an unknown process (the lock file is empty or unreadable)"
  started = holder.get("started")
  if isinstance(started, int | float):
    started = datetime.datetime.fromtimestamp(started).isoformat(" ", "seconds")
  return f"pid {holder.get('pid')} on host {holder.get('host')} (started {started})"


class _Lock:
  def __init__(self, path: str):
    self.path = path
    self.host = socket.gethostname()
    self.token = uuid.uuid4().hex  # Tells our lock file from a successor's.
    self.info = {"pid": os.getpid(), "host": self.host, "started": time.time(), "token": self.token}
    self.fd: int | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def acquire(self) -> None:
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        created = True
      except FileExistsError:
        try:
          fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:  # Released meanwhile: try to create it again.
          continue
        created = False
      flock = _try_flock(fd)
      if flock == "busy":
        holder = _read(fd)
        os.close(fd)
        raise self._locked_error(holder)
      if not _is_current(fd, self.path):  # Unlinked by its holder after we opened it.
        os.close(fd)
        continue
      if not created:
        holder = _read(fd)
        if not self._is_stale(holder, flock, fd):
          os.close(fd)
          raise self._locked_error(holder)
        logging.warning(
          "Taking over the stale lock %s of %s: that process is gone.",
          self.path,
          _describe(holder),
        )
      self.fd = fd
      self._write()
      break
    self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._heartbeat.start()

  def _is_stale(self, holder: dict[str, Any] | None, flock: str, fd: int) -> bool:
    idle = time.time() - os.fstat(fd).st_mtime
    if holder is None:  # Torn while written: its writer failed to flock, or is gone.
      return flock == "ours" or idle > STALE_AFTER_S
    if holder.get("host") == self.host:
      return flock == "ours" or not _pid_alive(holder.get("pid"))
    return idle > STALE_AFTER_S

  def _locked_error(self, holder: dict[str, Any] | None) -> WorkdirLockedError:
    return WorkdirLockedError(
      f"workdir {os.path.dirname(self.path)} is in use by {_describe(holder)}: two runs "
      "would mix their checkpoints and metrics. Stop that run, or wait for it; if it is "
      f"gone (a crashed host), delete {self.path}."
    )

  def _write(self) -> None:
    payload = json.dumps(self.info).encode()
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, payload, 0)
    os.fsync(self.fd)

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.fd)

  def release(self) -> None:
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
    # Unlink before the flock goes (with the fd): a process that opens the file meanwhile
    # finds it unlinked (_is_current) and starts over.
    with contextlib.suppress(OSError):
      if _is_current(self.fd, self.path) and (_read(self.fd) or {}).get("token") == self.token:
        os.unlink(self.path)
    os.close(self.fd)
    self.fd = None


def _try_flock(fd: int) -> str:
  """Returns "ours" (we hold it now), "busy" (another open file has it) or "unsupported"."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return "busy"
  except OSError as e:
    if e.errno in _NO_FLOCK:
      return "unsupported"
    raise
  return "ours"


def _is_current(fd: int, path: str) -> bool:
  """Whether `fd` is still the file at `path` (not unlinked or replaced)."""
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def _read(fd: int) -> dict[str, Any] | None:
  try:
    data = os.pread(fd, 1 << 16, 0)
    holder = json.loads(data)
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None
