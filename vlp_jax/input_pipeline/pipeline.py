"""grain pipelines: ArrayRecord shards -> per-process slice -> shuffle -> decode, augment,
tokenise -> batches of numpy arrays, in worker processes.

Train elements: {"image": uint8 (S, S, 3), "tokens": int32 (T,), "index": int64,
"skipped": int32}: "index" is the record's global position in the shards, "skipped"
counts the corrupt records dropped just before this element (summed per batch into the
`data/skipped` metric). Pixels stay uint8 until they reach the accelerator: 4x
less host->device traffic; the model normalises them.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import grain
import numpy as np
from absl import flags, logging
from PIL import Image

from vlp_jax.input_pipeline import records
from vlp_jax.input_pipeline.tokenizers import WordPieceTokenizer

# Decoding refuses images larger than this (decompression bombs); PIL warns at ~89M.
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
  """An image cannot be decoded."""


def open_image(data: bytes) -> Image.Image:
  """Encoded bytes -> RGB PIL image, refusing oversized images before decoding pixels."""
  try:
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_IMAGE_PIXELS:
      raise ImageError(f"image of {image.width}x{image.height} pixels exceeds {MAX_IMAGE_PIXELS}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
      # Composite transparent areas on white rather than on arbitrary hidden colours.
      rgba = image.convert("RGBA")
      image = Image.new("RGB", rgba.size, (255, 255, 255))
      image.paste(rgba, mask=rgba.getchannel("A"))
    else:
      image = image.convert("RGB")
    image.load()
  except ImageError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from e
  return image


def random_resized_crop_box(
  width: int,
  height: int,
  rng: np.random.Generator,
  scale: tuple[float, float],
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Inception-style crop box (left, top, right, bottom), torchvision's algorithm."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  return center_crop_box(width, height)


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  if image.format == "JPEG":
    # Decode JPEGs at a reduced scale when they are much larger than needed.
    crop_side = min(box[2] - box[0], box[3] - box[1])
    image.draft("RGB", (image.width * size // crop_side, image.height * size // crop_side))
  return np.asarray(image.resize((size, size), Image.BICUBIC, box=box), dtype=np.uint8)


@dataclasses.dataclass
class TrainTransform(grain.transforms.RandomMap):
  """(index, record bytes) -> augmented example, or None for a corrupt record."""

  tokenizer: WordPieceTokenizer
  image_size: int
  crop_scale: tuple[float, float]
  flip: bool

  def random_map(self, element: tuple[int, bytes], rng: np.random.Generator) -> dict | None:
    index, data = element
    try:
      record = records.decode_record(data)
      image = open_image(record["image"])
    except (records.RecordError, ImageError) as e:
      logging.log_every_n_seconds(logging.WARNING, "Skipping record %d: %s", 10, index, e)
      return None
    captions = record["captions"]
    text = captions[int(rng.integers(len(captions)))]
    box = random_resized_crop_box(image.width, image.height, rng, self.crop_scale)
    pixels = crop_resize(image, box, self.image_size)
    if self.flip and rng.uniform() < 0.5:
      pixels = pixels[:, ::-1]
    return {
      "image": np.ascontiguousarray(pixels),
      "tokens": self.tokenizer([text])[0],
      "index": np.int64(index),
      "skipped": np.int32(0),
    }


@dataclasses.dataclass
class EvalTransform(grain.transforms.Map):
  """(index, record bytes) -> center-cropped image with up to `max_captions` captions."""

  tokenizer: WordPieceTokenizer
  image_size: int
  max_captions: int

  def map(self, element: tuple[int, bytes]) -> dict | None:
    index, data = element
    try:
      record = records.decode_record(data)
      image = open_image(record["image"])
    except (records.RecordError, ImageError) as e:
      logging.warning("Skipping eval record %d: %s", index, e)
      return None
    captions = record["captions"][: self.max_captions]
    tokens = np.zeros((self.max_captions, self.tokenizer.context_length), np.int32)
    tokens[: len(captions)] = self.tokenizer(captions)
    box = center_crop_box(image.width, image.height)
    return {
      "image": crop_resize(image, box, self.image_size),
      "tokens": tokens,
      "caption_mask": np.arange(self.max_captions) < len(captions),
      "index": np.int64(index),
    }


@dataclasses.dataclass(frozen=True)
class _TagIndex(grain.transforms.MapWithIndex):
  num_records: int

  def map_with_index(self, index: int, data: bytes) -> tuple[int, bytes]:
    # Later epochs read past the end (grain wraps around): report the record's own index.
    return index % self.num_records, data


# More corrupt records than this in a row means the data is not in our format at all.
MAX_CONSECUTIVE_SKIPPED = 10_000


class _CountSkippedIterator(grain.DatasetIterator):
  def __next__(self) -> dict:
    skipped = 0
    while (element := next(self._parent)) is None:
      skipped += 1
      if skipped >= MAX_CONSECUTIVE_SKIPPED:
        raise ValueError(
          f"{skipped} records in a row could not be decoded: are these shards in "
          "vlp_jax's record format (see vlp_jax/input_pipeline/records.py)?"
        )
    element["skipped"] = np.int32(element["skipped"] + skipped)
    return element

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class CountSkipped(grain.IterDataset):
  """Drops None elements (corrupt records), adding their count to the next element."""

  def __iter__(self) -> grain.DatasetIterator:
    return _CountSkippedIterator(self._parent.__iter__())


def source_dataset(shards: list[str], process_index: int, process_count: int) -> grain.MapDataset:
  """(global index, bytes) records of this process's strided slice of the shards."""
  source = grain.sources.ArrayRecordDataSource(shards)
  dataset = grain.MapDataset.source(source).map_with_index(_TagIndex(len(source)))
  return dataset[process_index::process_count]


def create_train_dataset(
  shards: list[str],
  tokenizer: WordPieceTokenizer,
  *,
  batch_size: int,
  image_size: int,
  crop_scale: tuple[float, float],
  flip: bool,
  seed: int,
  num_workers: int,
  read_threads: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """Infinite iterator dataset of per-process training batches."""
  dataset = source_dataset(shards, process_index, process_count)
  if len(dataset) < batch_size:
    raise ValueError(
      f"process {process_index} has {len(dataset)} records, fewer than its batch of {batch_size}"
    )
  # repeat() re-seeds the shuffle and the augmentation every epoch.
  dataset = dataset.shuffle(seed=seed).repeat()
  dataset = dataset.random_map(
    TrainTransform(tokenizer, image_size, tuple(crop_scale), flip), seed=seed
  )
  read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size)
  iterable = CountSkipped(dataset.to_iter_dataset(read_options, allow_nones=True))
  iterable = iterable.batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; library users (tests, notebooks) never parsed any.
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iterable


def create_eval_dataset(
  shards: list[str],
  tokenizer: WordPieceTokenizer,
  *,
  image_size: int,
  max_captions: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """One pass over this process's slice; corrupt records come out as None."""
  dataset = source_dataset(shards, process_index, process_count)
  return dataset.map(EvalTransform(tokenizer, image_size, max_captions))
