"""grain pipelines. Training: ArrayRecord shard sets -> global shuffle per epoch -> mix by
weight -> decode, augment -> this process's rows of each global batch -> batch ->
tokenise, in worker processes. Evaluation: one pass over a per-process slice.

Train batches: {"image": uint8 (B, S, S, 3), "tokens": int32 (B, T), "index": int64,
"source": int32, "skipped": int32}: "index" is the record's position in the shards of
shard set "source" (its place in the training mixture), "skipped" counts the corrupt
records dropped just before each row (summed into the `data/skipped` metric). Pixels
stay uint8 until they reach the accelerator: 4x less host->device traffic; the model
normalises them. A method's `RowExtension` adds fields to every row (NegCLIP: a hard
image and negative captions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import grain
import numpy as np
from absl import flags, logging

from vlp_jax import processes
from vlp_jax.input_pipeline import records
from vlp_jax.input_pipeline.image_ops import (
  ImageError,
  center_crop_box,
  crop_resize,
  crop_resize_pixels,
  decode_pixels,
  image_dimensions,
  open_image,
  random_resized_crop_box,
)
from vlp_jax.input_pipeline.tokenizers import Tokenizer


@dataclasses.dataclass
class TrainTransform(grain.transforms.RandomMap):
  """(source, index, record bytes) -> augmented example with its caption text, or None
  for a corrupt record."""

  image_size: int
  crop_scale: tuple[float, float]
  flip: bool

  def augment(self, data: bytes, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Record bytes -> (augmented uint8 image, one of its captions), drawing from `rng`.

    Raises `records.RecordError` or `ImageError` for a corrupt record.
    """
    record = records.decode_record(data)
    captions = record["captions"]
    text = captions[int(rng.integers(len(captions)))]
    width, height = image_dimensions(record["image"])
    box = random_resized_crop_box(width, height, rng, self.crop_scale)
    max_shrink = min(box[2] - box[0], box[3] - box[1]) / self.image_size
    pixels = decode_pixels(record["image"], max_shrink)
    scale = pixels.shape[1] / width  # The decoder may have shrunk the image.
    pixels = crop_resize_pixels(pixels, tuple(v * scale for v in box), self.image_size)
    if self.flip and rng.uniform() < 0.5:
      pixels = cv2.flip(pixels, 1)
    return pixels, text

  def random_map(self, element: tuple[int, int, bytes], rng: np.random.Generator) -> dict | None:
    source, index, data = element
    try:
      pixels, text = self.augment(data, rng)
    except (records.RecordError, ImageError) as e:
      logging.log_every_n_seconds(logging.WARNING, "Skipping record %d: %s", 10, index, e)
      return None
    return {
      "image": pixels,
      "text": text,
      "index": np.int64(index),
      "source": np.int32(source),
      "skipped": np.int32(0),
    }


class RowExtension(Protocol):
  """What a method adds to each training row (vlp_jax.methods: `pipeline_extension`)."""

  def train_transform(
    self, base: TrainTransform, shard_sets: Sequence[records.ShardSet]
  ) -> grain.transforms.RandomMap:
    """`base` extended with the method's fields; drawing from the row's generator after
    `base` keeps the plain fields as they are without the extension."""
    ...

  def text_fields(self) -> tuple[tuple[str, str], ...]:
    """(text field, token field) pairs tokenised per batch, ("text", "tokens") first."""
    ...

  @property
  def word_ids(self) -> bool:
    """Also give every token field F a field F_word_ids (whole-word masking)."""
    ...


@dataclasses.dataclass(frozen=True)
class WithWordIds:
  """A RowExtension that adds only "tokens_word_ids": each token's word index in its
  caption (tokenizers.NO_WORD for special tokens and padding)."""

  word_ids: bool = True

  def train_transform(
    self, base: TrainTransform, shard_sets: Sequence[records.ShardSet]
  ) -> grain.transforms.RandomMap:
    del shard_sets
    return base

  def text_fields(self) -> tuple[tuple[str, str], ...]:
    return (("text", "tokens"),)


@dataclasses.dataclass
class TokenizeBatch(grain.transforms.Map):
  """Replaces a batch's "text" by "tokens": one tokeniser call per batch, not per caption
  (each call into TensorFlow costs ~0.3 ms whatever its size). `fields` names the
  (text field, token field) pairs to replace; all are tokenised in that one call."""

  tokenizer: Tokenizer
  fields: tuple[tuple[str, str], ...] = (("text", "tokens"),)
  word_ids: bool = False  # Also write F_word_ids for every token field F.

  def map(self, batch: dict) -> dict:
    texts = [[str(t) for t in batch.pop(text_field)] for text_field, _ in self.fields]
    flat = [t for field_texts in texts for t in field_texts]
    if self.word_ids:
      tokens, word_ids = self.tokenizer.encode_with_word_ids(flat)
    else:
      tokens, word_ids = self.tokenizer(flat), None
    start = 0
    for (_, token_field), field_texts in zip(self.fields, texts):
      batch[token_field] = tokens[start : start + len(field_texts)]
      if word_ids is not None:
        batch[f"{token_field}_word_ids"] = word_ids[start : start + len(field_texts)]
      start += len(field_texts)
    return batch


@dataclasses.dataclass
class EvalTransform(grain.transforms.Map):
  """(index, record bytes) -> center-cropped image with up to `max_captions` captions."""

  tokenizer: Tokenizer
  image_size: int
  max_captions: int

  def map(self, element: tuple[int, int, bytes]) -> dict | None:
    _, index, data = element
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
  source: int
  num_records: int

  def map_with_index(self, index: int, data: bytes) -> tuple[int, int, bytes]:
    # Later epochs read past the end (grain wraps around): report the record's own index.
    return self.source, index % self.num_records, data


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


def source_dataset(
  shards: Sequence[str], process_index: int, process_count: int, source: int = 0
) -> grain.MapDataset:
  """(source, global index, bytes) records of this process's strided slice of the shards."""
  records_source = grain.sources.ArrayRecordDataSource(list(shards))
  dataset = grain.MapDataset.source(records_source)
  dataset = dataset.map_with_index(_TagIndex(source, len(records_source)))
  return dataset[process_index::process_count]


class ProcessRows(grain.MapDataset):
  """This process's rows of every global batch: rows [p * b, (p + 1) * b) of batch g.

  Every process walks the same global sequence and reads only its own rows, so the
  global batch (rows in order) is the same whatever the number of processes.
  """

  def __init__(
    self, parent: grain.MapDataset, local_batch: int, process_index: int, process_count: int
  ):
    super().__init__(parent)
    self._local_batch = local_batch
    self._process_index = process_index
    self._process_count = process_count

  def __len__(self) -> int:
    num_batches = len(self._parent) // (self._local_batch * self._process_count)
    return num_batches * self._local_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local_batch)
    first = (batch * self._process_count + self._process_index) * self._local_batch
    return self._parent[first + row]

  def __str__(self) -> str:
    return f"ProcessRows[{self._process_index}/{self._process_count}]"


def _shuffled_mixture(
  shard_sets: Sequence[records.ShardSet], *, global_batch: int, seed: int
) -> grain.MapDataset:
  """Endless stream of all records, each set reshuffled every epoch, sets mixed by weight."""
  components = []
  for source, shard_set in enumerate(shard_sets):
    dataset = source_dataset(shard_set.shards, 0, 1, source)
    if len(dataset) < (global_batch if len(shard_sets) == 1 else 1):
      raise ValueError(
        f"{shard_set.spec!r} has {len(dataset)} records, fewer than a global batch of "
        f"{global_batch}"
      )
    # repeat() re-seeds the shuffle every epoch; one seed per set keeps their orders apart.
    components.append(dataset.shuffle(seed=seed + source).repeat())
  if len(components) == 1:
    return components[0]
  # A deterministic interleave in proportion to the weights: exact, and resumable by index.
  return grain.MapDataset.mix(components, [s.weight for s in shard_sets])


def create_train_dataset(
  shards: Sequence[str] | Sequence[records.ShardSet],
  tokenizer: Tokenizer,
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
  extension: RowExtension | None = None,
) -> grain.IterDataset:
  """Infinite iterator dataset of this process's training batches (`batch_size` rows).

  `shards` is one list of shard paths, or shard sets mixed by their weights. The shuffle
  is global; augmentation is seeded by the global position, so a run sees the same
  global batches on any number of processes.

  `extension` adds a method's fields to every row (see `RowExtension`).
  """
  if all(isinstance(s, str) for s in shards):
    shards = [records.ShardSet(",".join(shards), tuple(shards))]
  dataset = _shuffled_mixture(shards, global_batch=batch_size * process_count, seed=seed)
  transform = TrainTransform(image_size, tuple(crop_scale), flip)
  tokenize = TokenizeBatch(tokenizer)
  if extension is not None:
    transform = extension.train_transform(transform, shards)
    tokenize = TokenizeBatch(tokenizer, extension.text_fields(), extension.word_ids)
  dataset = dataset.random_map(transform, seed=seed)
  dataset = ProcessRows(dataset, batch_size, process_index, process_count)
  return batch_rows(
    dataset, batch_size, read_threads=read_threads, num_workers=num_workers, tokenize=tokenize
  )


def batch_rows(
  dataset: grain.MapDataset,
  batch_size: int,
  *,
  read_threads: int,
  num_workers: int,
  skip_nones: bool = True,
  tokenize: TokenizeBatch | None = None,
) -> grain.IterDataset:
  """This process's rows, in order -> batches of `batch_size` (the tail every pipeline
  shares: the image-text shards, the fine-tuning tasks): rows read by `read_threads`;
  with `skip_nones`, corrupt rows (None) dropped and counted into the next row's
  "skipped"; `tokenize` applied per batch; all in `num_workers` processes (0: here)."""
  read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size)
  iterable = dataset.to_iter_dataset(read_options, allow_nones=skip_nones)
  if skip_nones:
    iterable = CountSkipped(iterable)
  iterable = iterable.batch(batch_size, drop_remainder=True)
  if tokenize is not None:
    iterable = iterable.map(tokenize)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; library users (tests, notebooks) never parsed any.
      flags.FLAGS.mark_as_parsed()
    # Workers that outlive a killed trainer would keep their memory and shared memory.
    iterable = iterable.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers),
      worker_init_fn=processes.exit_with_parent,
    )
  return iterable


def create_eval_dataset(
  shards: list[str],
  tokenizer: Tokenizer,
  *,
  image_size: int,
  max_captions: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """One pass over this process's slice; corrupt records come out as None."""
  dataset = source_dataset(shards, process_index, process_count)
  return dataset.map(EvalTransform(tokenizer, image_size, max_captions))
