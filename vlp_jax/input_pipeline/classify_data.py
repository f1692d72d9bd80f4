"""Training batches of an image-classification set (classification_readers.py) for
fine-tuning a classifier: {"image" uint8 (B, S, S, 3), "label" int32 (B,), "skipped"
int32 (B,)}, with MAE's fine-tuning augmentation (random-resized crops, flips) when asked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from vlp_jax.input_pipeline import image_ops, pipeline, task_data
from vlp_jax.input_pipeline.classification_readers import ClassificationSet
from vlp_jax.input_pipeline.image_sources import DataError


@dataclasses.dataclass
class _ClassRows(grain.transforms.RandomMap):
  """(image source, label) -> {"image", "label", "skipped"}; None when unreadable."""

  image_size: int
  crop_scale: tuple[float, float] | None
  flip: bool
  skip_list: str = ""  # Where an unreadable file is listed (image_files.SKIP_LIST_FILE).

  def random_map(self, element: tuple[Any, int], rng: np.random.Generator) -> dict | None:
    source, label = element
    try:
      pixels = np.asarray(source.open(), np.uint8)
    except (DataError, image_ops.ImageError, OSError) as e:
      if self.skip_list:
        task_data.list_skip(self.skip_list, str(getattr(source, "path", source)), str(e))
      logging.log_every_n_seconds(logging.WARNING, "Skipping image %s: %s", 10, source, e)
      return None
    height, width = pixels.shape[:2]
    box = (0, 0, width, height)
    if self.crop_scale is not None:
      box = image_ops.random_resized_crop_box(width, height, rng, self.crop_scale)
    image = image_ops.crop_resize_pixels(pixels, box, self.image_size)
    if self.flip and rng.uniform() < 0.5:
      image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": np.int32(label), "skipped": np.int32(0)}


def create_classification_dataset(
  data: ClassificationSet,
  *,
  image_size: int,
  batch_size: int,
  seed: int,
  crop_scale: tuple[float, float] | None,
  flip: bool,
  num_workers: int = 0,
  read_threads: int = 4,
  process_index: int = 0,
  process_count: int = 1,
  skip_list: str = "",
) -> grain.IterDataset:
  """This process's endless, shuffled training batches of a classification set, drawn
  by global position (as pipeline.py), so any number of processes sees the same batches."""
  if not isinstance(data.images, Sequence):
    raise DataError(
      f"{data.name}: training needs random access to its images (class folders or a wds "
      "directory); a TFDS split is read in order only"
    )
  elements = list(zip(data.images, data.labels.tolist()))
  if len(elements) < batch_size * process_count:
    raise DataError(
      f"{data.name}: {len(elements)} images, fewer than a global batch of "
      f"{batch_size * process_count}"
    )
  dataset = grain.MapDataset.source(elements).shuffle(seed=seed).repeat()
  dataset = dataset.random_map(_ClassRows(image_size, crop_scale, flip, skip_list), seed=seed)
  dataset = pipeline.ProcessRows(dataset, batch_size, process_index, process_count)
  return pipeline.batch_rows(
    dataset, batch_size, read_threads=read_threads, num_workers=num_workers
  )
