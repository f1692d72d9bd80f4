"""Where a dataset's images come from: a file, encoded bytes, an ArrayRecord record or a
tar member, opened only when read (by the embedder, a fine-tuning batch or a reader's
check). A source that cannot be read raises `DataError` naming it.

Below evaluation and the methods, which both read images of datasets named on the
command line (evaluation/embedding.py, methods/negclip.py, the fine-tuning readers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from PIL import Image

from vlp_jax.config_lib import UserError
from vlp_jax.input_pipeline import image_files, image_ops, records


class DataError(UserError, ValueError):
  """A dataset file is missing or malformed; the message names the file and line/key."""


class ImageSource(Protocol):
  def open(self) -> Image.Image: ...


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """An image file or encoded bytes, cropped to `box` (left, top, right, bottom) if given."""

  path: str = ""
  data: bytes = b""
  box: tuple[float, float, float, float] | None = None

  def open(self) -> Image.Image:
    data = self.data
    if self.path:
      try:
        data = image_files.read_image_file(self.path)  # Bounded; never blocks on a FIFO.
      except OSError as e:
        raise DataError(f"cannot read image {self.path}: {e}") from e
    try:
      image = image_ops.open_image(data)
    except image_ops.ImageError as e:
      raise DataError(f"{self.path or 'image bytes'}: {e}") from e
    return image.crop(self.box) if self.box else image


@dataclasses.dataclass(frozen=True)
class RecordImage:
  """The image of record `index` of ArrayRecord shards, read when it is embedded."""

  source: Any  # grain.sources.ArrayRecordDataSource (thread-safe random access)
  index: int

  def open(self) -> Image.Image:
    try:
      return image_ops.open_image(records.decode_record(self.source[self.index])["image"])
    except (records.RecordError, image_ops.ImageError) as e:
      raise DataError(f"record {self.index}: {e}") from e


@dataclasses.dataclass(frozen=True)
class TarMember:
  """Encoded image bytes at an offset of a tar file, read when embedded."""

  path: str
  offset: int
  size: int

  def open(self) -> Image.Image:
    if self.size > image_files.MAX_IMAGE_BYTES:  # The tar header's size: never read whole.
      raise DataError(
        f"{self.path} at byte {self.offset}: an image of {self.size} bytes > "
        f"{image_files.MAX_IMAGE_BYTES}"
      )
    with open(self.path, "rb") as f:
      f.seek(self.offset)
      return ImageRef(data=f.read(self.size)).open()
