"""Readers of the image-text formats users have, for `convert`.

Each reader yields `Sample`s in a fixed order, each carrying the `Position` just after it
(which file, which sample within it), so a conversion can stop after any sample and
resume there. Readers only gather raw fields (image bytes or a path to them, caption as
stored); `convert` validates and normalises them, possibly in worker processes, and opens
image paths itself (regular files within the image root, read up to a byte limit). A
reader never writes anything: tar members in particular are read into memory, never
extracted, and none larger than the byte limit.

  webdataset  img2dataset tar shards: {key}.jpg|jpeg|png|webp, {key}.txt, {key}.json
  json        ALBEF/LilT lists: [{"image": path, "caption": str | [str, ...]}, ...]
  csv         open_clip's CSV/TSV: image path and caption columns (filepath, title)
  tfds        a prepared TFDS dataset with image and caption features (coco_captions)
  arrow       ViLT/VLC pyarrow files: `image` bytes and `caption` list-of-str columns
"""

from __future__ import annotations

import abc
import contextlib
import csv
import dataclasses
import glob
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from absl import logging

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


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.generic):
    return _text(value.item())
  return str(value)


def _python_value(value: Any) -> Any:
  """numpy arrays of strings (TFDS sequences) -> lists; everything else unchanged."""
  if isinstance(value, np.ndarray):
    return [_python_value(v) for v in value.tolist()] if value.ndim else value.item()
  return value


# ---------------------------------------------------------------- webdataset tar shards


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
    for unit in range(start[0], len(self.paths)):
      first = start[1] if unit == start[0] else 0
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


# ---------------------------------------------------------------- JSON lists and CSV


def _resolve_image(path: str, image_root: str) -> str:
  return path if os.path.isabs(path) else os.path.join(image_root, path)


def _containing_root(image_root: str, allow_outside_root: bool) -> str | None:
  """The real directory image files must resolve within; None when they may be anywhere."""
  return None if allow_outside_root else os.path.realpath(image_root)


class JsonListSource(Source):
  """ALBEF/LilT annotation lists: [{"image": path, "caption": str | [str]}, ...]."""

  def __init__(
    self,
    path: str,
    image_root: str = "",
    keys: tuple[str, str, str] = ("", "", ""),
    *,
    allow_outside_root: bool = False,
  ):
    self.path = os.path.abspath(path)
    # Without --image_root, images are found (and must stay) beside the annotation file.
    self.image_root = os.path.abspath(image_root or os.path.dirname(self.path))
    self.allow_outside_root = allow_outside_root
    self._root = _containing_root(self.image_root, allow_outside_root)
    defaults = DEFAULT_KEYS["json"]
    self.image_key, self.caption_key, self.id_key = (k or d for k, d in zip(keys, defaults))
    try:
      with open(self.path, "rb") as f:
        self.entries = json.load(f)
    except (OSError, ValueError) as e:
      raise SourceError(f"cannot read JSON list {self.path}: {e}") from e
    if not isinstance(self.entries, list):
      raise SourceError(f"{self.path} holds a {type(self.entries).__name__}, not a JSON list")

  def describe(self) -> dict[str, Any]:
    return {
      "format": "json",
      "file": self.path,
      "image_root": self.image_root,
      "allow_outside_root": self.allow_outside_root,
      "keys": [self.image_key, self.caption_key, self.id_key],
    }

  def count(self) -> int:
    return len(self.entries)

  def read(
    self, start: Position = (0, 0), *, max_image_bytes: int = MAX_IMAGE_BYTES
  ) -> Iterator[Sample]:
    for index in range(start[1], len(self.entries)):
      entry, position = self.entries[index], (0, index + 1)
      if not isinstance(entry, dict) or not isinstance(entry.get(self.image_key), str):
        yield Sample(position, f"entry-{index}", skip="bad_entry")
        continue
      image = entry[self.image_key]
      key = _text(entry[self.id_key]) if self.id_key in entry else image
      yield Sample(
        position,
        key,
        image_path=_resolve_image(image, self.image_root),
        image_root=self._root,
        caption=entry.get(self.caption_key),
      )


class CsvSource(Source):
  """open_clip's CSV/TSV: a header row, an image path column and a caption column."""

  def __init__(
    self,
    path: str,
    image_root: str = "",
    keys: tuple[str, str, str] = ("", "", ""),
    separator: str = "",
    *,
    allow_outside_root: bool = False,
  ):
    self.path = os.path.abspath(path)
    # Without --image_root, images are found (and must stay) beside the annotation file.
    self.image_root = os.path.abspath(image_root or os.path.dirname(self.path))
    self.allow_outside_root = allow_outside_root
    self._root = _containing_root(self.image_root, allow_outside_root)
    defaults = DEFAULT_KEYS["csv"]
    self.image_key, self.caption_key, self.id_key = (k or d for k, d in zip(keys, defaults))
    # open_clip's default separator is a tab; a .csv file almost always means commas.
    self.separator = separator or ("," if self.path.endswith(".csv") else "\t")
    header = next(self._rows(), None)
    if header is None:
      raise SourceError(f"{self.path} is empty")
    missing = [k for k in (self.image_key, self.caption_key) if k not in header]
    if missing:
      raise SourceError(
        f"{self.path} has no column {missing} (columns: {header}); set --image_key/"
        "--caption_key, or --separator if the columns were not split"
      )
    self.columns = header

  def _rows(self) -> Iterator[list[str]]:
    try:
      # surrogateescape keeps undecodable bytes visible, so a bad caption is skipped, not mangled.
      with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        yield from csv.reader(f, delimiter=self.separator)
    except (OSError, csv.Error) as e:
      raise SourceError(f"cannot read {self.path}: {e}") from e

  def describe(self) -> dict[str, Any]:
    return {
      "format": "csv",
      "file": self.path,
      "image_root": self.image_root,
      "allow_outside_root": self.allow_outside_root,
      "separator": self.separator,
      "keys": [self.image_key, self.caption_key, self.id_key],
    }

  def read(
    self, start: Position = (0, 0), *, max_image_bytes: int = MAX_IMAGE_BYTES
  ) -> Iterator[Sample]:
    rows = self._rows()
    next(rows)  # The header.
    image_col, caption_col = (
      self.columns.index(self.image_key),
      self.columns.index(self.caption_key),
    )
    id_col = self.columns.index(self.id_key) if self.id_key in self.columns else None
    for index, row in enumerate(rows):
      if index < start[1]:
        continue
      position = (0, index + 1)
      if len(row) != len(self.columns):
        yield Sample(position, f"row-{index}", skip="bad_entry")
        continue
      image = row[image_col]
      yield Sample(
        position,
        row[id_col] if id_col is not None else image,
        image_path=_resolve_image(image, self.image_root),
        image_root=self._root,
        caption=row[caption_col],
      )


# ---------------------------------------------------------------- TFDS


def _lookup(example: dict[str, Any], key: str) -> Any:
  """`key` in a nested example; "a/b" is either a feature named so or b inside a."""
  if key in example:
    return example[key]
  parts = key.split("/")
  for i in range(1, len(parts)):
    head = "/".join(parts[:i])
    if head in example and isinstance(example[head], dict):
      return _lookup(example[head], "/".join(parts[i:]))
  raise KeyError(key)


class TfdsSource(Source):
  """A prepared TFDS dataset in a local data_dir; images are read encoded, never decoded."""

  def __init__(
    self, name: str, data_dir: str, split: str, keys: tuple[str, str, str] = ("", "", "")
  ):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    with contextlib.suppress(RuntimeError):  # Raised when TensorFlow is already running.
      tf.config.set_visible_devices([], "GPU")  # Reading needs no accelerator.
    self.name, self.split = name, split
    self.data_dir = os.path.abspath(data_dir) if data_dir else ""
    defaults = DEFAULT_KEYS["tfds"]
    self.image_key, self.caption_key, self.id_key = (k or d for k, d in zip(keys, defaults))
    try:
      self.builder = tfds.builder(name, data_dir=self.data_dir or None)
      features = self.builder.info.features
    except Exception as e:  # tfds raises many types for a missing or unknown dataset.
      raise SourceError(f"cannot open TFDS dataset {name!r} in {self.data_dir!r}: {e}") from e
    if self.image_key not in features:
      raise SourceError(
        f"TFDS dataset {name!r} has no feature {self.image_key!r} (features: {list(features)})"
      )
    self._decoders = {self.image_key: tfds.decode.SkipDecoding()}

  def describe(self) -> dict[str, Any]:
    return {
      "format": "tfds",
      "name": self.name,
      "version": str(self.builder.info.version),
      "data_dir": self.data_dir,
      "split": self.split,
      "keys": [self.image_key, self.caption_key, self.id_key],
    }

  def count(self) -> int | None:
    try:
      return int(self.builder.info.splits[self.split].num_examples)
    except (KeyError, ValueError, TypeError):
      return None

  def read(
    self, start: Position = (0, 0), *, max_image_bytes: int = MAX_IMAGE_BYTES
  ) -> Iterator[Sample]:
    # Images arrive already read, sizes unknown before: `convert` applies max_image_bytes.
    import tensorflow_datasets as tfds

    try:
      dataset = self.builder.as_dataset(
        split=self.split, decoders=self._decoders, shuffle_files=False
      )
    except Exception as e:
      raise SourceError(f"cannot read split {self.split!r} of TFDS {self.name!r}: {e}") from e
    for index, example in enumerate(tfds.as_numpy(dataset.skip(start[1])), start=start[1]):
      position = (0, index + 1)
      try:
        key = _text(_lookup(example, self.id_key))
      except KeyError:
        key = f"{self.split}-{index}"
      try:
        image = _lookup(example, self.image_key)
        caption = _python_value(_lookup(example, self.caption_key))
      except KeyError as e:
        raise SourceError(f"TFDS {self.name!r} examples have no feature {e}") from e
      if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim >= 2:
        image = _encode_png(image)  # A pixel tensor rather than an Image feature: keep it exact.
      else:
        image = _python_value(image)
      yield Sample(position, key, image=image, caption=caption)


def _encode_png(pixels: np.ndarray) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(pixels.squeeze().astype(np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


# ---------------------------------------------------------------- pyarrow tables


class ArrowSource(Source):
  """ViLT/VLC .arrow files (pyarrow's RecordBatchFileWriter): image bytes, caption list."""

  ROWS_PER_READ = 256  # Rows copied out of the memory map at a time.

  def __init__(self, spec: str, keys: tuple[str, str, str] = ("", "", "")):
    self.paths = resolve_files(spec, (".arrow",))
    defaults = DEFAULT_KEYS["arrow"]
    self.image_key, self.caption_key, self.id_key = (k or d for k, d in zip(keys, defaults))

  def describe(self) -> dict[str, Any]:
    return {
      "format": "arrow",
      "files": self.paths,
      "keys": [self.image_key, self.caption_key, self.id_key],
    }

  def count(self) -> int | None:
    import pyarrow as pa

    total = 0
    for path in self.paths:
      try:
        with pa.memory_map(path) as f:
          reader = pa.ipc.open_file(f)
          total += sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
      except (OSError, pa.ArrowException):
        return None
    return total

  def read(
    self, start: Position = (0, 0), *, max_image_bytes: int = MAX_IMAGE_BYTES
  ) -> Iterator[Sample]:
    import pyarrow as pa

    for unit in range(start[0], len(self.paths)):
      first = start[1] if unit == start[0] else 0
      try:
        yield from self._read_file(unit, first, max_image_bytes)
      except (OSError, pa.ArrowException) as e:
        yield Sample(
          (unit + 1, 0),
          self.paths[unit],
          file_error=f"unreadable arrow file ({type(e).__name__}: {e})",
        )

  def _read_file(self, unit: int, first: int, max_bytes: int) -> Iterator[Sample]:
    import pyarrow as pa
    import pyarrow.compute as pc

    path = self.paths[unit]
    stem = os.path.splitext(os.path.basename(path))[0]
    with pa.memory_map(path) as f:
      reader = pa.ipc.open_file(f)
      names = reader.schema.names
      missing = [k for k in (self.image_key, self.caption_key) if k not in names]
      if missing:
        raise SourceError(
          f"{path} has no column {missing} (columns: {names}); set --image_key/--caption_key"
        )
      row = 0  # Index of the batch's first row within the file.
      for b in range(reader.num_record_batches):
        batch = reader.get_batch(b)
        for offset in range(max(first - row, 0), batch.num_rows, self.ROWS_PER_READ):
          part = batch.slice(offset, self.ROWS_PER_READ)
          images = part.column(self.image_key)
          too_large = pc.fill_null(pc.greater(pc.binary_length(images), max_bytes), False)
          # Oversized cells become nulls here, so they are never copied out of the map.
          images = pc.if_else(too_large, pa.scalar(None, images.type), images).to_pylist()
          too_large = too_large.to_pylist()
          captions = part.column(self.caption_key).to_pylist()
          ids = part.column(self.id_key).to_pylist() if self.id_key in names else None
          for i, (image, caption) in enumerate(zip(images, captions)):
            index = row + offset + i
            key = _text(ids[i]) if ids is not None else f"{stem}-{index}"
            skip = "image_file_too_large" if too_large[i] else None
            yield Sample((unit, index + 1), key, image=image, caption=caption, skip=skip)
        row += batch.num_rows


def create_source(
  kind: str,
  src: str = "",
  *,
  image_root: str = "",
  allow_outside_root: bool = False,
  keys: tuple[str, str, str] = ("", "", ""),
  separator: str = "",
  tfds_name: str = "",
  tfds_data_dir: str = "",
  split: str = "train",
) -> Source:
  """The reader for format `kind` (one of FORMATS); empty `keys` take the format's defaults."""
  if kind != "tfds" and not src:
    raise SourceError(f"--src is required for --from={kind}")
  if kind == "webdataset":
    return WebDatasetSource(src)
  if kind == "json":
    return JsonListSource(src, image_root, keys, allow_outside_root=allow_outside_root)
  if kind == "csv":
    return CsvSource(src, image_root, keys, separator, allow_outside_root=allow_outside_root)
  if kind == "tfds":
    if not tfds_name:
      raise SourceError("--tfds_name is required for --from=tfds")
    return TfdsSource(tfds_name, tfds_data_dir, split, keys)
  if kind == "arrow":
    return ArrowSource(src, keys)
  raise SourceError(f"unknown format {kind!r}; expected one of {', '.join(FORMATS)}")
