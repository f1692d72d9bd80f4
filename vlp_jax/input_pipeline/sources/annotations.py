"""Annotation files that name image files: ALBEF/LilT JSON lists and open_clip's CSV/TSV."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from typing import Any

from vlp_jax.input_pipeline.sources.base import (
  DEFAULT_KEYS,
  MAX_IMAGE_BYTES,
  Position,
  Sample,
  Source,
  SourceError,
  as_text,
)


class _AnnotationFile(Source):
  """One annotation file naming image files under an image root; the formats differ only
  in how they parse the file into rows."""

  FORMAT = ""  # A DEFAULT_KEYS entry.

  def __init__(
    self, path: str, image_root: str, keys: tuple[str, str, str], allow_outside_root: bool
  ):
    self.path = os.path.abspath(path)
    # Without --image_root, images are found (and must stay) beside the annotation file.
    self.image_root = os.path.abspath(image_root or os.path.dirname(self.path))
    self.allow_outside_root = allow_outside_root
    # The real directory image files must resolve within; None when they may be anywhere.
    self._root = None if allow_outside_root else os.path.realpath(self.image_root)
    defaults = DEFAULT_KEYS[self.FORMAT]
    self.image_key, self.caption_key, self.id_key = (k or d for k, d in zip(keys, defaults))

  def describe(self) -> dict[str, Any]:
    return {
      "format": self.FORMAT,
      "file": self.path,
      "image_root": self.image_root,
      "allow_outside_root": self.allow_outside_root,
      **self._described_options(),
      "keys": [self.image_key, self.caption_key, self.id_key],
    }

  def _described_options(self) -> dict[str, Any]:
    return {}

  def _sample(self, position: Position, key: str, image: str, caption: Any) -> Sample:
    path = image if os.path.isabs(image) else os.path.join(self.image_root, image)
    return Sample(position, key, image_path=path, image_root=self._root, caption=caption)


class JsonListSource(_AnnotationFile):
  """ALBEF/LilT annotation lists: [{"image": path, "caption": str | [str]}, ...]."""

  FORMAT = "json"

  def __init__(
    self,
    path: str,
    image_root: str = "",
    keys: tuple[str, str, str] = ("", "", ""),
    *,
    allow_outside_root: bool = False,
  ):
    super().__init__(path, image_root, keys, allow_outside_root)
    try:
      with open(self.path, "rb") as f:
        self.entries = json.load(f)
    except (OSError, ValueError) as e:
      raise SourceError(f"cannot read JSON list {self.path}: {e}") from e
    if not isinstance(self.entries, list):
      raise SourceError(f"{self.path} holds a {type(self.entries).__name__}, not a JSON list")

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
      key = as_text(entry[self.id_key]) if self.id_key in entry else image
      yield self._sample(position, key, image, entry.get(self.caption_key))


class CsvSource(_AnnotationFile):
  """open_clip's CSV/TSV: a header row, an image path column and a caption column."""

  FORMAT = "csv"

  def __init__(
    self,
    path: str,
    image_root: str = "",
    keys: tuple[str, str, str] = ("", "", ""),
    separator: str = "",
    *,
    allow_outside_root: bool = False,
  ):
    super().__init__(path, image_root, keys, allow_outside_root)
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

  def _described_options(self) -> dict[str, Any]:
    return {"separator": self.separator}

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
      key = row[id_col] if id_col is not None else image
      yield self._sample(position, key, image, row[caption_col])
