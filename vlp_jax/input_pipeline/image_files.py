"""The one way user image files are opened: the converter, the fine-tuning task readers
and the evaluation readers all read them here.

A path is read only when it resolves (symlinks followed) to a regular file of at most
`max_bytes`, checked with stat before opening: a device (/dev/zero) never ends, a FIFO
blocks its reader until a writer comes, and a sparse file claims gigabytes it would cost
in memory. The open itself never blocks (O_NONBLOCK), fstat checks what was opened (a
file swapped after the check), and the read stops at max_bytes + 1 (a file may grow, or
in /proc lie about its size). A refusal is an `ImageFileError` whose `reason` is the
name it is counted under and whose message names the file.
"""

from __future__ import annotations

import os
import stat

# The default byte limit per image (and per tar caption file): no real photo needs more.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
# Beside a fine-tuning run's checkpoints: every image file it could not read, one
# "<path>\t<why>" line each (the log names only the first few).
SKIP_LIST_FILE = "unreadable_images.txt"


class ImageFileError(OSError):
  """An image file that is not read; `reason` is the name it is counted under."""

  def __init__(self, reason: str, path: str, detail: str = ""):
    self.reason, self.path, self.detail = reason, path, detail or path
    super().__init__(f"{reason}: {self.detail}")

  def __reduce__(self):  # Crosses process boundaries (grain and converter workers).
    return type(self), (self.reason, self.path, self.detail)


def _check(info: os.stat_result, path: str, max_bytes: int) -> None:
  if not stat.S_ISREG(info.st_mode):
    raise ImageFileError(
      "image_not_a_regular_file", path, f"{path} (mode {stat.filemode(info.st_mode)})"
    )
  if info.st_size > max_bytes:
    raise ImageFileError(
      "image_file_too_large", path, f"{path}: {info.st_size} bytes > {max_bytes}"
    )


def check_image_file(path: str, root: str | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> str:
  """The real path of `path` when `read_image_file` would read it (without opening it);
  ImageFileError otherwise. `root`: a real directory the file must resolve within."""
  try:
    real = os.path.realpath(path)
    if root is not None and os.path.commonpath([root, real]) != root:
      raise ImageFileError("image_outside_root", path, f"{path} resolves to {real}, outside {root}")
    _check(os.stat(real), path, max_bytes)
  except ImageFileError:
    raise
  except FileNotFoundError as e:
    raise ImageFileError("missing_image", path) from e
  except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path.
    raise ImageFileError("unreadable_image_file", path, f"{path!r}: {e}") from e
  return real


def read_image_file(path: str, root: str | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
  """The bytes of the regular file `path` (at most `max_bytes`); ImageFileError naming
  it when it is missing, not a regular file, too large or outside `root`."""
  real = check_image_file(path, root, max_bytes)
  try:
    # O_NOFOLLOW: a symlink swapped in after the check cannot leave the root.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    with open(os.open(real, flags), "rb") as f:
      _check(os.fstat(f.fileno()), path, max_bytes)
      data = f.read(max_bytes + 1)
  except ImageFileError:
    raise
  except FileNotFoundError as e:
    raise ImageFileError("missing_image", path) from e
  except (OSError, ValueError) as e:
    raise ImageFileError("unreadable_image_file", path, f"{path!r}: {e}") from e
  if len(data) > max_bytes:
    raise ImageFileError("image_file_too_large", path, f"{path}: over {max_bytes} bytes")
  return data


def read_image_header(path: str, size: int = 1 << 16, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
  """The first `size` bytes of an image file, with `read_image_file`'s checks (a cheap
  look at many files before training)."""
  real = check_image_file(path, None, max_bytes)
  try:
    with open(os.open(real, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
      _check(os.fstat(f.fileno()), path, max_bytes)
      return f.read(size)
  except ImageFileError:
    raise
  except (OSError, ValueError) as e:
    raise ImageFileError("unreadable_image_file", path, f"{path!r}: {e}") from e
