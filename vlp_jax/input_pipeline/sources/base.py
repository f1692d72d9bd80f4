"""What every reader shares: the `Sample` it yields, the `Source` interface, its errors,
and the resolution of file specs (directories, globs, brace patterns, comma lists)."""

from __future__ import annotations

import abc
import dataclasses
import glob
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from vlp_jax.input_pipeline import image_files

FORMATS = ("webdataset", "json", "csv", "tfds", "arrow")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_BYTES = image_files.MAX_IMAGE_BYTES  # Per image and per tar caption file.
# Field names per format: (image, caption, key); a missing key field falls back to a position.
DEFAULT_KEYS = {
  "json": ("image", "caption", "image_id"),
  "csv": ("filepath", "title", ""),
  "tfds": ("image", "captions/text", "image/filename"),
  "arrow": ("image", "caption", "image_id"),
}

Position = tuple[int, int]  # (file index, sample index within that file)


class SourceError(ValueError):
  """The source as a whole cannot be read (missing file, wrong columns, ...)."""


@dataclasses.dataclass
class Sample:
  """One raw image-text pair, or a note that the reader could not read part of the source.

  Exactly one of `image` and `image_path` is set for a usable sample; `image_root` is the
  real directory `image_path` must resolve within (None: anywhere). `skip` names the
  reason when the reader already knows the sample is unusable, `file_error` when a whole
  source file was unreadable (then `key` is that file's path).
  """

  position: Position
  key: str
  image: bytes | None = None
  image_path: str | None = None
  image_root: str | None = None
  caption: Any = None
  skip: str | None = None
  file_error: str | None = None


class Source(abc.ABC):
  """An ordered, resumable stream of samples."""

  @abc.abstractmethod
  def describe(self) -> dict[str, Any]:
    """What identifies this data (format, resolved files, field names): compared on resume."""

  def count(self) -> int | None:
    """The number of samples, when known without reading them all (for the progress bar)."""
    return None

  @abc.abstractmethod
  def read(
    self, start: Position = (0, 0), *, max_image_bytes: int = MAX_IMAGE_BYTES
  ) -> Iterator[Sample]:
    """Samples from `start` on, in the same order every time.

    Images stored with their size (tar members, arrow cells) over `max_image_bytes` are
    skipped unread; `convert` bounds the rest.
    """


def file_starts(start: Position, num_files: int) -> Iterator[tuple[int, int]]:
  """(file index, first sample to read in it) of a read over `num_files` files resumed at
  `start`: the start's own file from its sample, every later file from its first."""
  for unit in range(start[0], num_files):
    yield unit, start[1] if unit == start[0] else 0


def expand_braces(spec: str) -> list[str]:
  """Expands a{000..002}.tar to a000.tar a001.tar a002.tar and {x,y}.tar to x.tar y.tar."""
  match = re.search(r"\{([^{}]*)\}", spec)
  if not match:
    return [spec]
  head, body, tail = spec[: match.start()], match.group(1), spec[match.end() :]
  if numeric := re.fullmatch(r"(\d+)\.\.(\d+)", body):
    lo, hi = numeric.groups()
    width = len(lo) if lo.startswith("0") else 0
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    options = body.split(",")
  return [path for option in options for path in expand_braces(head + option + tail)]


def _split_top_level_commas(spec: str) -> list[str]:
  parts, depth, current = [], 0, ""
  for char in spec:
    depth += (char == "{") - (char == "}")
    if char == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += char
  return [p.strip() for p in [*parts, current] if p.strip()]


def resolve_files(spec: str, suffixes: tuple[str, ...]) -> list[str]:
  """A directory (files ending in `suffixes`), glob, brace pattern, or comma list -> paths."""
  paths: list[str] = []
  for part in _split_top_level_commas(spec):
    for path in expand_braces(part):
      if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(suffixes))
      elif any(c in path for c in "*?["):
        found = sorted(glob.glob(path))
      else:
        found = [path] if os.path.isfile(path) else []
      if not found:
        raise SourceError(f"no {'/'.join(suffixes)} files found at {path!r}")
      paths.extend(os.path.abspath(p) for p in found)
  if not paths:
    raise SourceError(f"no source files in {spec!r}")
  return paths


def as_text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.generic):
    return as_text(value.item())
  return str(value)


def python_value(value: Any) -> Any:
  """numpy arrays of strings (TFDS sequences) -> lists; everything else unchanged."""
  if isinstance(value, np.ndarray):
    return [python_value(v) for v in value.tolist()] if value.ndim else value.item()
  return value
