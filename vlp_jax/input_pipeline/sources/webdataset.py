"""img2dataset's webdataset tar shards, read in memory (members are never extracted)."""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from absl import logging

from vlp_jax.input_pipeline.sources.base import (
  IMAGE_EXTENSIONS,
  MAX_IMAGE_BYTES,
  Position,
  Sample,
  Source,
  file_starts,
  resolve_files,
)


def _member_key(name: str) -> tuple[str, str]:
  """Member name -> (key, extension); webdataset's key runs up to the base name's first dot."""
  while name.startswith("./"):
    name = name[2:]
  directory, _, base = name.rpartition("/")
  stem, _, extension = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _is_unsafe(name: str) -> bool:
  return name.startswith("/") or ".." in PurePosixPath(name).parts


class _TarInfo(tarfile.TarInfo):
  """Notes on its archive a header that ended iteration early (tarfile says nothing)."""

  @classmethod
  def fromtarfile(cls, archive: _TarFile) -> tarfile.TarInfo:
    try:
      return super().fromtarfile(archive)
    except tarfile.EOFHeaderError:
      raise  # A block of zeros: the end-of-archive marker.
    except tarfile.HeaderError as e:
      archive.stopped_early = str(e)
      raise


class _TarFile(tarfile.TarFile):
  """A TarFile that says why iteration stopped: at a cut or bad header, not just at the end."""

  tarinfo = _TarInfo
  stopped_early: str | None = None  # None: stopped at the end-of-archive marker.


class WebDatasetSource(Source):
  """img2dataset's output: tar shards of {key}.jpg + {key}.txt (+ {key}.json)."""

  def __init__(self, spec: str):
    self.paths = resolve_files(spec, (".tar",))

  def describe(self) -> dict[str, Any]:
    return {"format": "webdataset", "files": self.paths}

  def count(self) -> int | None:
    # img2dataset writes {shard}_stats.json beside each shard with its number of samples.
    total = 0
    for path in self.paths:
      stats = re.sub(r"\.tar$", "_stats.json", path)
      try:
        with open(stats) as f:
          total += int(json.load(f)["successes"])
      except (OSError, ValueError, KeyError, TypeError):
        return None
    return total

  def read(
    self, start: Position = (0, 0), *, max_image_bytes: int = MAX_IMAGE_BYTES
  ) -> Iterator[Sample]:
    for unit, first in file_starts(start, len(self.paths)):
      yield from self._read_tar(unit, first, max_image_bytes)

  def _read_tar(self, unit: int, first: int, max_bytes: int) -> Iterator[Sample]:
    path = self.paths[unit]
    index = 0  # Samples seen in this tar, emitted or not.
    group: list[tarfile.TarInfo] = []
    try:
      with _TarFile.open(path, "r:*") as tar:
        for member in tar:
          if member.isdir():
            continue
          if group and _member_key(member.name)[0] != _member_key(group[0].name)[0]:
            if index >= first:
              yield self._sample(tar, group, (unit, index + 1), max_bytes)
            index += 1
            group = []
          group.append(member)
        if group:
          if index >= first:
            yield self._sample(tar, group, (unit, index + 1), max_bytes)
          index += 1
        stopped_early, offset = tar.stopped_early, tar.offset
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      if not index and not group:
        yield Sample(
          (unit + 1, 0), path, file_error=f"unreadable tar file ({type(e).__name__}: {e})"
        )
        return
      stopped_early, offset = f"{type(e).__name__}: {e}", None
    if stopped_early is not None:
      # Counted once per tar, after its samples: a resumed run finds the same cut.
      where = f" at byte {offset}" if offset is not None else ""
      logging.warning(
        "%s ends early%s (%s): cut short or corrupt; the %d samples before are kept.",
        path,
        where,
        stopped_early,
        index,
      )
      yield Sample((unit + 1, 0), path, skip="truncated_tar")

  @staticmethod
  def _sample(
    tar: tarfile.TarFile, group: list[tarfile.TarInfo], position: Position, max_bytes: int
  ) -> Sample:
    key = _member_key(group[0].name)[0]
    sample = Sample(position, key)
    if any(_is_unsafe(m.name) for m in group):
      sample.skip = "unsafe_member_name"
      return sample
    fields: dict[str, tarfile.TarInfo] = {}
    for member in group:
      fields.setdefault(_member_key(member.name)[1], member)
    image_member = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
    if image_member is None:
      sample.skip = "missing_image"
      return sample
    if not image_member.isfile():
      sample.skip = "image_not_a_regular_file"  # A link could point anywhere: never follow.
      return sample
    if image_member.size > max_bytes:
      sample.skip = "image_file_too_large"
      return sample
    if any(fields[e].size > max_bytes for e in ("txt", "json") if e in fields):
      sample.skip = "caption_file_too_large"
      return sample
    sample.image = tar.extractfile(image_member).read()
    if (text := fields.get("txt")) is not None and text.isfile():
      sample.caption = tar.extractfile(text).read()
    elif (meta := fields.get("json")) is not None and meta.isfile():
      # img2dataset also stores the caption in the metadata when no .txt was written.
      try:
        sample.caption = json.loads(tar.extractfile(meta).read()).get("caption")
      except (ValueError, AttributeError):
        sample.caption = None
    return sample
