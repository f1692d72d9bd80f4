"""Sources that hold the image bytes themselves: prepared TFDS datasets and ViLT/VLC
pyarrow files."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from vlp_jax.input_pipeline.sources.base import (
  DEFAULT_KEYS,
  MAX_IMAGE_BYTES,
  Position,
  Sample,
  Source,
  SourceError,
  as_text,
  file_starts,
  python_value,
  resolve_files,
)


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
        key = as_text(_lookup(example, self.id_key))
      except KeyError:
        key = f"{self.split}-{index}"
      try:
        image = _lookup(example, self.image_key)
        caption = python_value(_lookup(example, self.caption_key))
      except KeyError as e:
        raise SourceError(f"TFDS {self.name!r} examples have no feature {e}") from e
      if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim >= 2:
        image = _encode_png(image)  # A pixel tensor rather than an Image feature: keep it exact.
      else:
        image = python_value(image)
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

    for unit, first in file_starts(start, len(self.paths)):
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
            key = as_text(ids[i]) if ids is not None else f"{stem}-{index}"
            skip = "image_file_too_large" if too_large[i] else None
            yield Sample((unit, index + 1), key, image=image, caption=caption, skip=skip)
        row += batch.num_rows
