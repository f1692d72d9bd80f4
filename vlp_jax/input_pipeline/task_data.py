"""What the fine-tuning tasks' datasets share (vqa_data.py, nlvr2_data.py,
classify_data.py): reading task files with errors naming the file and line
(`TaskDataError`), loading and screening images (an unreadable image is left out of
training and listed in the run's skip list, image_files.SKIP_LIST_FILE), and the grain
batching of examples into rows.

Batches hold uint8 pixels of the whole image resized to S x S (a crop could cut away what
a question or statement is about; no flips, which swap left and right) plus each task's
fields. Training batches add "skipped" int32 (unreadable images dropped just before the
row, as in pipeline.py) and are shuffled, endless and seeded. Evaluation batches are one
ordered pass over this process's share, padded to the same number of batches on every
process, with "valid" bool (B,): False for padding and for rows whose image could not be
read (they keep their id; the warning names the file).
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import grain
import numpy as np
from absl import logging

from vlp_jax.config_lib import UserError
from vlp_jax.input_pipeline import image_files, image_ops, pipeline
from vlp_jax.input_pipeline.tokenizers import Tokenizer


class TaskDataError(UserError, ValueError):
  """A task's file is missing or malformed; the message names the file and line/key."""


# ----------------------------------------------------------------------------- files


def read_text(path: str) -> str:
  """A UTF-8 text file; TaskDataError naming the file, and the line and byte of the
  first byte that is not UTF-8."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise TaskDataError(f"{path} does not exist") from e
  except IsADirectoryError as e:
    raise TaskDataError(f"{path} is a directory, not a file") from e
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise TaskDataError(
      f"{path}:{line}: byte {data[e.start : e.start + 1]!r} at column {column} (offset "
      f"{e.start}) is not UTF-8 ({e.reason}); the file must be UTF-8 text"
    ) from e


def read_json(path: str) -> Any:
  """A JSON file; TaskDataError naming the file and line."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def json_field(entry: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
  """entry[key] of type `kind`, or a TaskDataError naming `where` and the key."""
  if not isinstance(entry, dict) or key not in entry:
    raise TaskDataError(f"{where}: missing {key!r}")
  value = entry[key]
  if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
    raise TaskDataError(f"{where}: {key!r} is {value!r}, of the wrong type")
  return value


def json_list(data: Any, key: str, path: str) -> list:
  """The top-level list data[key] of the file `path`."""
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise TaskDataError(f"{path}: no {key!r} list at the top level")
  return data[key]


def check_images_exist(paths: Sequence[str], source: str, image_root: str) -> None:
  """TaskDataError when none of `paths` exists (a wrong images= directory), a warning
  when some are missing (the datasets skip their rows)."""
  distinct = list(dict.fromkeys(paths))
  missing = [p for p in distinct if not os.path.lexists(p)]
  if len(missing) == len(distinct):
    raise TaskDataError(
      f"{source}: none of the {len(distinct)} images it names exist under images="
      f"{image_root} (the first: {missing[0]}); is images= the right directory?"
    )
  if missing:
    logging.warning(
      "%d of %d images of %s are not under %s (first: %s); their rows will be skipped",
      len(missing),
      len(distinct),
      source,
      image_root,
      missing[0],
    )


# ----------------------------------------------------------------------------- datasets


def load_image(
  path: str,
  image_size: int,
  rng: np.random.Generator | None = None,
  crop_scale: tuple[float, float] | None = None,
) -> np.ndarray:
  """An image file -> uint8 (S, S, 3): the whole image, or a random-resized crop when
  `crop_scale` is given, resized as the training pipeline does (shrunk while decoding,
  then OpenCV). Raises OSError (image_files.ImageFileError: missing, not a regular file,
  too large) or image_ops.ImageError (corrupt) naming the file."""
  data = image_files.read_image_file(path)
  width, height = image_ops.image_dimensions(data)
  box = (0, 0, width, height)
  if crop_scale is not None and rng is not None:
    box = image_ops.random_resized_crop_box(width, height, rng, crop_scale)
  pixels = image_ops.decode_pixels(data, min(box[2] - box[0], box[3] - box[1]) / image_size)
  scale = pixels.shape[1] / width  # The decoder may have shrunk the image.
  return image_ops.crop_resize_pixels(pixels, tuple(v * scale for v in box), image_size)


def check_image(path: str) -> None:
  """Raises ImageFileError or image_ops.ImageError when `path` is not an image by a cheap
  look: image_files' checks and a header that parses (a corrupt body shows only when the
  image is decoded)."""
  size = 1 << 14  # Holds a JPEG's tables up to its scan but for large EXIF / ICC blocks.
  header = image_files.read_image_header(path, size)
  try:
    image_ops.image_dimensions(header)
  except image_ops.ImageError:
    if len(header) < size:
      raise  # The whole file was read.
    image_ops.image_dimensions(image_files.read_image_file(path))  # A header past 16 KiB.


def _problem(path: str, check: Callable[[str], Any] = check_image) -> str:
  try:
    check(path)
  except (OSError, image_ops.ImageError) as e:
    return str(e).replace("\n", " ")
  return ""


def screen_images(
  paths: Sequence[str], read_threads: int = 4, check: Callable[[str], Any] = check_image
) -> dict[str, str]:
  """{path: why} of the distinct `paths` that fail `check`, in first-use order."""
  distinct = list(dict.fromkeys(paths))
  with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool:
    problems = list(pool.map(functools.partial(_problem, check=check), distinct))
  return {path: why for path, why in zip(distinct, problems) if why}


def write_skip_list(path: str, problems: dict[str, str]) -> None:
  """Adds `problems` to the image_files.SKIP_LIST_FILE lines of `path`: a resumed run
  keeps the files found unreadable before (while training, too) listed."""
  listed: dict[str, str] = {}
  with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
    listed = dict(line.rstrip("\n").partition("\t")[::2] for line in f if line.strip())
  listed.update(problems)
  with open(f"{path}.tmp", "w", encoding="utf-8") as f:
    f.writelines(f"{p}\t{why}\n" for p, why in listed.items())
  os.replace(f"{path}.tmp", path)


def drop_unreadable(
  examples: Sequence[Any],
  *,
  source: str,
  max_skipped_fraction: float,
  skip_list: str = "",
  read_threads: int = 4,
  images_of: Callable[[Any], Sequence[str]] = lambda example: example.images,
  check: Callable[[str], Any] = check_image,
) -> list[Any]:
  """The training examples whose images (their `images`, or `images_of`) pass `check`
  (default `check_image`): a first pass over the task data, so that unreadable files
  stop a run before it trains, not after.

  Every unreadable file goes to `skip_list` (when given), all of them; a TaskDataError
  when more than `max_skipped_fraction` (config.data.max_skipped_fraction) of the
  examples would be left out, else a warning and the rest.
  """
  problems = screen_images([p for e in examples for p in images_of(e)], read_threads, check)
  if skip_list:
    write_skip_list(skip_list, problems)
  if not problems:
    return list(examples)
  kept = [e for e in examples if not any(p in problems for p in images_of(e))]
  left_out = len(examples) - len(kept)
  listed = f"all listed in {skip_list}" if skip_list else "not listed (no skip list)"
  first, why = next(iter(problems.items()))
  summary = (
    f"{left_out} of {len(examples)} training examples of {source} have an unreadable "
    f"image: {len(problems)} files, {listed}; the first: {first} ({why})"
  )
  if left_out > max_skipped_fraction * len(examples):
    raise TaskDataError(
      f"{summary}. That is {left_out / len(examples):.1%} > "
      f"config.data.max_skipped_fraction={max_skipped_fraction}: fix or remove them (or raise "
      "the fraction) before training"
    )
  logging.warning("%s; they are left out.", summary)
  return kept


# (skip list, path) pairs this process has listed already: each file is listed once.
_LISTED: set[tuple[str, str]] = set()
_LISTED_LOCK = threading.Lock()


def list_skip(skip_list: str, path: str, why: str) -> None:
  """Adds "<path>\t<why>" to `skip_list` unless this process listed `path` there."""
  with _LISTED_LOCK:
    if (skip_list, path) in _LISTED:
      return
    _LISTED.add((skip_list, path))
  # Appends of one short line: whole even from several reader threads and processes.
  with open(skip_list, "a", encoding="utf-8") as f:
    f.write(f"{path}\t{why}\n")


def _load_images(
  paths: Sequence[str],
  image_size: int,
  rng: np.random.Generator,
  crop_scale: tuple[float, float] | None,
  skip_list: str = "",
) -> list[np.ndarray] | None:
  images = []
  for path in paths:
    try:
      images.append(load_image(path, image_size, rng, crop_scale))
    except (OSError, image_ops.ImageError) as e:
      if skip_list:
        list_skip(skip_list, path, str(e).replace("\n", " "))
      where = f" (every such file is listed in {skip_list})" if skip_list else ""
      logging.log_every_n_seconds(logging.WARNING, "Skipping image %s: %s%s", 10, path, e, where)
      return None
  return images


@dataclasses.dataclass
class TaskRows(grain.transforms.RandomMap):
  """(example, extra) -> row; an unreadable image gives None in training (dropped and
  counted by CountSkipped) and an invalid row in evaluation. Example None: padding."""

  image_size: int
  train: bool
  crop_scale: tuple[float, float] | None
  skip_list: str = ""  # Where an unreadable file is listed (image_files.SKIP_LIST_FILE).

  image_fields: ClassVar[tuple[str, ...]] = ("image",)

  @abc.abstractmethod
  def paths(self, example: Any) -> list[str]:
    """The image files of `example`, in `image_fields` order."""

  @abc.abstractmethod
  def fields(self, example: Any, extra: Any) -> dict[str, Any]:
    """The row's non-image fields."""

  @abc.abstractmethod
  def padding(self) -> dict[str, Any]:
    """The non-image fields of a padding row (no example)."""

  def random_map(self, element: tuple[Any, Any], rng: np.random.Generator) -> dict | None:
    example, extra = element
    if example is None:
      return self._without_images(self.padding())
    crop_scale = self.crop_scale if self.train else None
    images = _load_images(self.paths(example), self.image_size, rng, crop_scale, self.skip_list)
    row = self.fields(example, extra)
    if images is None:
      return None if self.train else self._without_images(row)
    row.update(zip(self.image_fields, images))
    if self.train:
      row["skipped"] = np.int32(0)
    else:
      row["valid"] = np.bool_(True)
    return row

  def _without_images(self, row: dict[str, Any]) -> dict[str, Any]:
    blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    return {**row, **dict.fromkeys(self.image_fields, blank), "valid": np.bool_(False)}


def task_batches(
  elements: list[tuple[Any, Any]],
  rows: TaskRows,
  tokenizer: Tokenizer | None,
  *,
  batch_size: int,
  seed: int,
  num_workers: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  read_threads: int = 4,
) -> grain.IterDataset:
  """This process's batches of `elements` ((example, extra) pairs) made rows by `rows`:
  in training endless and shuffled, in evaluation one padded pass (module docstring);
  a "text" field becomes "tokens" through `tokenizer` (None: the rows have no text)."""
  if rows.train:
    if len(elements) < batch_size * process_count:
      raise ValueError(
        f"{len(elements)} training examples, fewer than a global batch of "
        f"{batch_size * process_count}"
      )
    # As pipeline.py: repeat() reshuffles every epoch and rows are drawn by global
    # position, so the global batches are the same on any number of processes.
    dataset = grain.MapDataset.source(elements).shuffle(seed=seed).repeat()
    dataset = dataset.random_map(rows, seed=seed)
    dataset = pipeline.ProcessRows(dataset, batch_size, process_index, process_count)
  else:
    # A strided share per process, padded so that every process runs as many batches.
    share = elements[process_index::process_count]
    num_batches = math.ceil(math.ceil(len(elements) / process_count) / batch_size)
    share += [(None, None)] * (num_batches * batch_size - len(share))
    dataset = grain.MapDataset.source(share).random_map(rows, seed=seed)
  tokenize = pipeline.TokenizeBatch(tokenizer) if tokenizer is not None else None
  return pipeline.batch_rows(
    dataset,
    batch_size,
    read_threads=read_threads,
    num_workers=num_workers,
    skip_nones=rows.train,
    tokenize=tokenize,
  )
