"""Readers for image-classification sets (zero-shot classification and linear probes).

Class-folder trees (torchvision ImageFolder's layout, one folder per split), CLIP_benchmark
webdataset directories (`.cls` labels, `classnames.txt`,
`zeroshot_classification_templates.txt`) and TFDS image-classification datasets prepared
in a local data_dir (`tfds:<name>,data_dir=...`). Malformed input raises `DataError`
naming the file and the line or key.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from vlp_jax.input_pipeline.dataset_files import (
  IMAGE_EXTENSIONS,
  DatasetSpec,
  is_wds,
  read_json,
  read_lines,
  stem,
  wds_items,
)
from vlp_jax.input_pipeline.image_sources import DataError, ImageRef, ImageSource


@dataclasses.dataclass
class ClassificationSet:
  name: str
  images: Iterable[ImageSource]  # iterated once per embedding pass, in label order
  labels: np.ndarray
  classnames: list[str]
  templates: list[str] | None = None  # from the dataset (wds), if it has its own


def _packaged_list(name: str) -> list[str]:
  """A list shipped in vlp_jax/evaluation/templates/, one entry per line (read as a file:
  importing vlp_jax.evaluation from the input pipeline would invert the layers)."""
  path = importlib.resources.files("vlp_jax").joinpath("evaluation", "templates", name)
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_class_folders(root: str, name: str = "") -> ClassificationSet:
  """torchvision ImageFolder's layout: root/<class>/**/<image>; classes in sorted order."""
  if not os.path.isdir(root):
    raise DataError(f"{root} is not a directory")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not classes:
    raise DataError(f"{root}: no class folders")
  images: list[ImageSource] = []
  labels = []
  for label, cls in enumerate(classes):
    found = sorted(
      os.path.join(d, f)
      for d, _, files in os.walk(os.path.join(root, cls))
      for f in files
      if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not found:
      raise DataError(f"{os.path.join(root, cls)}: class folder without images")
    images.extend(ImageRef(p) for p in found)
    labels.extend([label] * len(found))
  classnames = classes
  if len(classes) == 1000 and all(re.fullmatch(r"n\d{8}", c) for c in classes):
    classnames = _packaged_list("imagenet_classnames.txt")  # WordNet ids -> CLIP's names
  return ClassificationSet(name or stem(root), images, np.asarray(labels), classnames)


def read_wds_classification(root: str, split: str = "test", name: str = "") -> ClassificationSet:
  images: list[ImageSource] = []
  labels = []
  for where, image, label in wds_items(root, split, "cls", "label"):
    images.append(image)
    try:
      labels.append(int(label.decode().strip()))
    except ValueError as e:
      raise DataError(f"{where}: .cls is not an integer: {label[:20]!r}") from e
  classnames_file = os.path.join(root, "classnames.txt")
  classnames = read_lines(classnames_file) if os.path.exists(classnames_file) else []
  templates_file = os.path.join(root, "zeroshot_classification_templates.txt")
  templates = read_lines(templates_file) if os.path.exists(templates_file) else None
  return ClassificationSet(name or stem(root), images, np.asarray(labels), classnames, templates)


class _TfdsImages:
  """Re-reads a TFDS split's encoded images on each iteration (nothing held in memory)."""

  def __init__(self, builder: Any, split: str, image_key: str):
    self.builder, self.split, self.image_key = builder, split, image_key

  def __iter__(self) -> Iterator[ImageSource]:
    for example in self._examples():
      yield ImageRef(data=bytes(example[self.image_key]))

  def _examples(self) -> Iterator[dict[str, Any]]:
    import tensorflow_datasets as tfds

    dataset = self.builder.as_dataset(
      split=self.split,
      shuffle_files=False,
      decoders={self.image_key: tfds.decode.SkipDecoding()},
    )
    return iter(tfds.as_numpy(dataset))


def read_tfds(spec: DatasetSpec, split: str) -> ClassificationSet:
  """`tfds:<name>[,data_dir=...,image_key=image,label_key=label]`, prepared beforehand."""
  from vlp_jax.input_pipeline.tokenizers import import_tensorflow

  import_tensorflow()  # No GPU memory grab, one inter-op thread.
  import tensorflow_datasets as tfds

  dataset_name = spec.path.removeprefix("tfds:")
  data_dir = spec.get("data_dir") or None
  try:
    builder = tfds.builder(dataset_name, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # tfds raises several unrelated types for "not found"
    raise DataError(f"tfds:{dataset_name} (data_dir={data_dir}): {e}") from e
  image_key, label_key = spec.get("image_key", "image"), spec.get("label_key", "label")
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise DataError(f"tfds:{dataset_name}: no feature {key!r}; it has {sorted(features)}")
  if split not in builder.info.splits:
    raise DataError(
      f"tfds:{dataset_name}: no split {split!r}; it has {sorted(builder.info.splits)}"
    )
  images = _TfdsImages(builder, split, image_key)
  labels = np.asarray([int(e[label_key]) for e in images._examples()], np.int64)
  classnames = list(getattr(features[label_key], "names", []))
  return ClassificationSet(f"tfds/{dataset_name}", images, labels, classnames)


def read_classification(
  spec: DatasetSpec, split: str, require_split: bool = False
) -> ClassificationSet:
  """Any supported classification format; `split` picks a wds/TFDS split or a subfolder
  (a folder tree without that subfolder is the split itself, unless `require_split`)."""
  path, name = spec.path, spec.get("name")
  if path.startswith("tfds:"):
    data = read_tfds(spec, split)
  elif is_wds(path):
    data = read_wds_classification(path, split, name)
  elif os.path.isdir(os.path.join(path, split)):
    data = read_class_folders(os.path.join(path, split), name or stem(path))
  elif require_split:
    raise DataError(f"{path}: no {split}/ folder of classes")
  else:
    data = read_class_folders(path, name)
  if name:
    data.name = name
  if spec.get("classnames"):
    file = spec.get("classnames")
    data.classnames = read_json(file) if file.endswith(".json") else read_lines(file)
  if not data.classnames:
    raise DataError(f"{path}: no class names; pass classnames=<file, one per line>")
  if len(data.labels) and data.labels.max() >= len(data.classnames):
    raise DataError(
      f"{path}: label {int(data.labels.max())} but only {len(data.classnames)} class names"
    )
  return data


def read_templates(file: str) -> list[str] | dict[str, list[str]]:
  """One template per line ("a photo of a {c}."), or a JSON list / {class: prompts} map."""
  if file.endswith(".json"):
    templates = read_json(file)
    if not isinstance(templates, list | dict):
      raise DataError(f"{file}: expected a list of templates or a map class -> prompts")
    return templates
  templates = read_lines(file)
  for number, template in enumerate(templates, 1):
    if "{c}" not in template and "{}" not in template:
      raise DataError(f"{file}:{number}: template without a {{c}} placeholder")
  return templates
