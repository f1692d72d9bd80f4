"""Readers for retrieval sets in their official formats. Dataset specs (`path[,key=value...]`
named on the command line), file helpers and webdataset access: input_pipeline/dataset_files.py.

Retrieval: Karpathy-split JSON (`{"images": [{"filepath", "filename", "split",
"sentences": [{"raw"}]}]}`), COCO caption JSON (`images` + `annotations`, as
CLIP_benchmark's `coco_test_karpathy.json`), the ALBEF/BLIP list (`[{"image",
"caption"}]`), CLIP_benchmark's Flickr30k txt (`image,caption` lines), CLIP_benchmark
webdataset directories (`<split>/nshards.txt`, `<split>/0.tar`...) and our ArrayRecord
shards. Classification sets: input_pipeline/classification_readers.py.

Malformed input raises `DataError` naming the file and the line or key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
from absl import logging

from vlp_jax.input_pipeline import image_ops, records
from vlp_jax.input_pipeline.dataset_files import (
  DatasetSpec,
  is_wds,
  parse_specs,  # Evaluation's tasks parse their --data.<task> specs through here.
  read_json,
  read_text,
  require,
  stem,
  wds_items,
)
from vlp_jax.input_pipeline.image_sources import DataError, ImageRef, ImageSource, RecordImage

__all__ = [
  "DatasetSpec",
  "RetrievalSet",
  "parse_specs",
  "read_caption_json",
  "read_flickr_txt",
  "read_record_retrieval",
  "read_retrieval",
  "read_wds_retrieval",
]

# ----------------------------------------------------------------------------- retrieval


@dataclasses.dataclass
class RetrievalSet:
  name: str
  images: Sequence[ImageSource]
  captions: list[list[str]]  # per image, at least one
  negatives: list[dict[str, str]] | None = None  # per image: kind -> negative caption
  skipped: int = 0  # records that could not be read (ArrayRecord only)


def _captions(value: Any, where: str) -> list[str]:
  captions = [value] if isinstance(value, str) else value
  if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
    raise DataError(f"{where}: captions must be a string or a list of strings")
  captions = [c for c in captions if c.strip()]
  if not captions:
    raise DataError(f"{where}: no caption")
  return captions


def read_caption_json(
  path: str, image_root: str, split: str = "test", name: str = ""
) -> RetrievalSet:
  """Karpathy-split, COCO-caption or ALBEF/BLIP-list JSON (detected from its layout)."""
  data = read_json(path)
  root = image_root or os.path.dirname(path)
  images: list[ImageSource] = []
  captions: list[list[str]] = []
  if isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" in data:
    by_id: dict[Any, list[str]] = {}
    files = {}
    for i, entry in enumerate(data["images"]):
      where = f"{path}: images[{i}]"
      files[require(entry, "id", where, (int, str))] = require(entry, "file_name", where)
    for i, ann in enumerate(require(data, "annotations", path, list)):
      where = f"{path}: annotations[{i}]"
      image_id = require(ann, "image_id", where, (int, str))
      if image_id not in files:
        raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
      by_id.setdefault(image_id, []).append(require(ann, "caption", where))
    for image_id in sorted(files):  # torchvision's CocoCaptions order
      images.append(ImageRef(os.path.join(root, files[image_id])))
      captions.append(_captions(by_id.get(image_id, []), f"{path}: image id {image_id!r}"))
    name = name or "mscoco_captions"
  elif isinstance(data, dict) and isinstance(data.get("images"), list):
    for i, entry in enumerate(data["images"]):
      where = f"{path}: images[{i}]"
      if require(entry, "split", where) != split:
        continue
      filename = require(entry, "filename", where)
      sentences = require(entry, "sentences", where, list)
      texts = [require(s, "raw", f"{where}.sentences[{j}]") for j, s in enumerate(sentences)]
      images.append(ImageRef(os.path.join(root, entry.get("filepath", ""), filename)))
      captions.append(_captions(texts, where))
    name = name or {"coco": "mscoco_captions"}.get(data.get("dataset"), data.get("dataset", ""))
    if not images:
      raise DataError(f"{path}: no image has split {split!r}")
  elif isinstance(data, list):
    for i, entry in enumerate(data):
      where = f"{path}: [{i}]"
      images.append(ImageRef(os.path.join(root, require(entry, "image", where))))
      captions.append(_captions(require(entry, "caption", where, (str, list)), where))
  else:
    raise DataError(
      f"{path}: not a Karpathy-split ('images' with 'sentences'), COCO caption ('images' + "
      "'annotations') or ALBEF/BLIP list ([{'image', 'caption'}]) file"
    )
  if not images:
    raise DataError(f"{path}: no images")
  return RetrievalSet(name or stem(path), images, captions)


def read_flickr_txt(path: str, image_root: str, name: str = "") -> RetrievalSet:
  """CLIP_benchmark's flickr30k_<split>_karpathy.txt: a header, then `<image>.jpg,<caption>`."""
  by_image: dict[str, list[str]] = {}
  lines = read_text(path).splitlines()
  for number, line in enumerate(lines[1:], 2):
    if not line.strip():
      continue
    image, sep, caption = line.strip().partition(".jpg,")
    if not sep or not caption.strip():
      raise DataError(f"{path}:{number}: expected '<image>.jpg,<caption>'")
    by_image.setdefault(image + ".jpg", []).append(caption)
  if not by_image:
    raise DataError(f"{path}: no captions")
  root = image_root or os.path.dirname(path)
  return RetrievalSet(
    name or "flickr30k",
    [ImageRef(os.path.join(root, image)) for image in by_image],
    list(by_image.values()),
  )


def read_record_retrieval(shards: Sequence[str], max_captions: int, name: str) -> RetrievalSet:
  """Our ArrayRecord records; unreadable records are skipped, logged and counted."""
  source = grain.sources.ArrayRecordDataSource(list(shards))
  images: list[ImageSource] = []
  captions, negatives, skipped = [], [], 0
  for index in range(len(source)):
    try:
      record = records.decode_record(source[index])
      image_ops.check_image(record["image"])  # A truncated body must not stop the run later.
    except (records.RecordError, image_ops.ImageError) as e:
      logging.warning("Skipping eval record %d: %s", index, e)
      skipped += 1
      continue
    images.append(RecordImage(source, index))
    captions.append(record["captions"][:max_captions])
    found = record.get("negatives")
    negatives.append(found if isinstance(found, dict) else {})
  if not images:
    raise DataError(f"no readable records in {list(shards)}")
  return RetrievalSet(name, images, captions, negatives, skipped)


# --------------------------------------------------------------------- webdataset (wds)


def read_wds_retrieval(root: str, split: str = "test", name: str = "") -> RetrievalSet:
  images: list[ImageSource] = []
  captions = []
  for where, image, text in wds_items(root, split, "txt", "captions"):
    images.append(image)
    captions.append(_captions(text.decode("utf-8").splitlines(), where))
  return RetrievalSet(name or stem(root), images, captions)


def read_retrieval(spec: DatasetSpec, max_captions: int) -> RetrievalSet:
  """Any supported retrieval format, chosen from the path."""
  path, name = spec.path, spec.get("name")
  if is_wds(path):
    return read_wds_retrieval(path, spec.get("split", "test"), name)
  if path.endswith(".json"):
    return read_caption_json(path, spec.get("images"), spec.get("split", "test"), name)
  if path.endswith((".txt", ".csv")):
    return read_flickr_txt(path, spec.get("images"), name)
  try:
    shards = records.resolve_shards(path)
  except (FileNotFoundError, ValueError) as e:
    raise DataError(
      f"{path}: not a webdataset directory, caption JSON, Flickr txt or ArrayRecord shards"
    ) from e
  return read_record_retrieval(shards, max_captions, name or stem(path))
