"""Shared setup for the command-line entry points."""

from __future__ import annotations

import logging as py_logging
import os

from absl import logging

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


def quiet_library_logs() -> None:
  """Keeps our INFO lines and the libraries' warnings; drops the libraries' INFO chatter."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
