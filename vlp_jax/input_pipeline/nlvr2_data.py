"""NLVR2 in its official format: the jsonl reader and the grain dataset of image-pair
batches.

Files: jsonl (`train.json`, `dev.json`, `test1.json`: one {"identifier", "sentence",
"label": "True" | "False", "directory"?} per line). Identifier `split-set-pair-sentence`
has the images `split-set-pair-img0.png` (left) and `-img1.png` (right), looked up in
`image_root/<directory>` (the official train layout), `image_root`, or anywhere below
`image_root` by file name (or by stem, for re-encoded copies).

Batches (task_data.py's rows): {"image", "image2" uint8 (B, S, S, 3) (the left and right
images), "tokens" int32 (B, T), "label" int32 (B,) (1: true), "index" int64 (B,): the
row's position in `examples`, which names its identifier}.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import grain
import numpy as np
from absl import logging

from vlp_jax.input_pipeline.task_data import (
  TaskDataError,
  TaskRows,
  json_field,
  read_text,
  task_batches,
)
from vlp_jax.input_pipeline.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class Nlvr2Example:
  """One NLVR2 statement about an image pair."""

  identifier: str  # split-set-pair-sentence
  sentence: str
  label: bool
  left: str  # image paths
  right: str

  @property
  def images(self) -> tuple[str, ...]:
    return self.left, self.right


class _ImageFinder:
  """Finds an image by name in the expected folders, else anywhere below the root (by
  name, then by stem); the recursive index is built once, on the first miss."""

  def __init__(self, root: str):
    self._root = root
    self._index: dict[str, str] | None = None

  def _build_index(self) -> dict[str, str]:
    index: dict[str, str] = {}
    for folder, _, names in sorted(os.walk(self._root)):
      for name in sorted(names):
        path = os.path.join(folder, name)
        index.setdefault(name, path)
        index.setdefault(os.path.splitext(name)[0], path)
    return index

  def find(self, name: str, folders: Sequence[str]) -> str | None:
    for folder in folders:
      path = os.path.join(self._root, folder, name)
      if os.path.isfile(path):
        return path
    if self._index is None:
      self._index = self._build_index()
    return self._index.get(name) or self._index.get(os.path.splitext(name)[0])


def read_nlvr2(jsonl: str, image_root: str) -> list[Nlvr2Example]:
  """An NLVR2 jsonl file -> examples in file order. An image found nowhere keeps its
  expected path (the datasets skip the row, naming the file) and is counted here."""
  lines = read_text(jsonl).splitlines()
  finder = _ImageFinder(image_root)
  examples, missing = [], []
  first_line: dict[str, int] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{jsonl}:{number}"
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskDataError(f"{where}: not valid JSON ({e.msg})") from e
    identifier = json_field(entry, "identifier", where, str)
    if identifier in first_line:
      raise TaskDataError(
        f"{where}: identifier {identifier!r} repeats line {first_line[identifier]} "
        "(consistency groups and predictions go by identifier)"
      )
    first_line[identifier] = number
    stem, sep, _ = identifier.rpartition("-")
    if not sep:
      raise TaskDataError(f"{where}: identifier {identifier!r} is not split-set-pair-sentence")
    label = str(json_field(entry, "label", where, str | bool)).lower()
    if label not in ("true", "false"):
      raise TaskDataError(f"{where}: label {entry['label']!r} is not 'True' or 'False'")
    folders = [str(entry["directory"]), ""] if "directory" in entry else [""]
    paths = []
    for side in ("img0", "img1"):
      name = f"{stem}-{side}.png"
      path = finder.find(name, folders)
      if path is None:
        missing.append(name)
        path = os.path.join(image_root, folders[0], name)
      paths.append(path)
    examples.append(
      Nlvr2Example(identifier, json_field(entry, "sentence", where, str), label == "true", *paths)
    )
  if not examples:
    raise TaskDataError(f"{jsonl}: no examples (the file is empty)")
  if len(missing) == 2 * len(examples):
    raise TaskDataError(
      f"{jsonl}: none of the {len(missing)} images it names exist under images={image_root} "
      f"(the first: {missing[0]}); is images= the right directory?"
    )
  if missing:
    logging.warning(
      "%d of %d images of %s are not under %s (first: %s); their rows will be skipped",
      len(missing),
      2 * len(examples),
      jsonl,
      image_root,
      missing[0],
    )
  return examples


# ----------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class _Nlvr2Rows(TaskRows):
  image_fields: ClassVar[tuple[str, ...]] = ("image", "image2")

  def paths(self, example: Nlvr2Example) -> list[str]:
    return [example.left, example.right]

  def fields(self, example: Nlvr2Example, index: int) -> dict[str, Any]:
    return {"text": example.sentence, "label": np.int32(example.label), "index": np.int64(index)}

  def padding(self) -> dict[str, Any]:
    return {"text": "", "label": np.int32(-1), "index": np.int64(-1)}


def create_nlvr2_dataset(
  examples: Sequence[Nlvr2Example],
  tokenizer: Tokenizer,
  *,
  image_size: int,
  train: bool,
  crop_scale: tuple[float, float] | None = None,
  skip_list: str = "",
  **batching: Any,
) -> grain.IterDataset:
  """NLVR2 batches for this process (fields: module docstring); "image" is the left
  image, "image2" the right one; `skip_list` and `batching` as for VQA."""
  rows = _Nlvr2Rows(image_size, train, crop_scale, skip_list)
  return task_batches(
    [(example, i) for i, example in enumerate(examples)], rows, tokenizer, **batching
  )
