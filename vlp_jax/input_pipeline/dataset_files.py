"""Datasets named on the command line and the file formats they come in.

A dataset is `path[,key=value...]` (several separated by ";"), e.g.
`--data.zeroshot_retrieval=/data/coco/dataset_coco.json,images=/data/coco`; `DatasetSpec`
holds one. Text, JSON and line files are read with errors naming the file and line
(`DataError`); CLIP_benchmark's webdataset directories (`<split>/nshards.txt`,
`<split>/0.tar`...) are read sample by sample. Evaluation's readers and the fine-tuning
methods' training data both read specs through here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

from vlp_jax.input_pipeline import task_data
from vlp_jax.input_pipeline.image_sources import DataError, ImageSource, TarMember

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # what CLIP_benchmark's wds reader takes


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset named on the command line: a path and key=value options."""

  path: str
  options: dict[str, str]
  text: str

  def get(self, key: str, default: str = "") -> str:
    return self.options.get(key, default)


def parse_specs(text: str, flag: str, known: Sequence[str]) -> list[DatasetSpec]:
  """ "a,k=v;b" -> specs; an unknown option fails naming the flag and the known ones."""
  specs = []
  for part in [p.strip() for p in text.split(";") if p.strip()]:
    path, *items = [i.strip() for i in part.split(",")]
    options = {}
    for item in items:
      key, sep, value = item.partition("=")
      if not sep or key not in known:
        raise ValueError(f"{flag}: option {item!r} in {part!r} is not one of {sorted(known)}")
      options[key] = os.path.expanduser(value)
    specs.append(DatasetSpec(os.path.expanduser(path), options, part))
  return specs


def read_text(path: str) -> str:
  """A UTF-8 file's text; DataError naming the file (and the line of a byte that is not
  UTF-8, task_data.read_text's message)."""
  try:
    return task_data.read_text(path)
  except task_data.TaskDataError as e:
    raise DataError(str(e)) from e


def read_json(path: str) -> Any:
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def read_lines(path: str) -> list[str]:
  """Non-empty stripped lines; an empty line in the middle is an error naming it."""
  lines = [line.strip() for line in read_text(path).splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  for number, line in enumerate(lines, 1):
    if not line:
      raise DataError(f"{path}:{number}: empty line")
  if not lines:
    raise DataError(f"{path} is empty")
  return lines


def require(entry: Any, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
  """entry[key] of the given type, or a DataError naming `where` and the key."""
  if not isinstance(entry, dict) or key not in entry:
    raise DataError(f"{where}: missing key {key!r}")
  value = entry[key]
  if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
    raise DataError(f"{where}: key {key!r} is {type(value).__name__}, not the expected type")
  return value


def stem(path: str) -> str:
  """A dataset name from its path: the file or folder name without extension."""
  return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


# --------------------------------------------------------------------- webdataset (wds)


def wds_samples(tar_path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, {extension: TarMember | bytes}) per sample, webdataset's grouping: members
  with the same path up to the first dot of their base name, consecutive in the tar."""
  try:
    with tarfile.open(tar_path) as tar:
      yield from _group_members(tar, tar_path)
  except (OSError, tarfile.TarError) as e:
    raise DataError(f"cannot read {tar_path}: {e}") from e


def _group_members(tar: tarfile.TarFile, tar_path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  key, sample = None, {}
  for member in tar:
    if not member.isfile():
      continue
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", member.name)
    if not match:
      continue
    prefix, ext = match.group(1), match.group(2).lower()
    if prefix != key:
      if key is not None:
        yield key, sample
      key, sample = prefix, {}
    if ext in WDS_IMAGE_EXTENSIONS:
      sample[ext] = TarMember(tar_path, member.offset_data, member.size)
    else:
      sample[ext] = tar.extractfile(member).read()
  if key is not None:
    yield key, sample


def wds_tars(root: str, split: str) -> list[str]:
  nshards_file = os.path.join(root, split, "nshards.txt")
  lines = read_lines(nshards_file)
  try:
    count = int(lines[0])
  except ValueError as e:
    raise DataError(f"{nshards_file}:1: not a number of shards: {lines[0]!r}") from e
  tars = [os.path.join(root, split, f"{i}.tar") for i in range(count)]
  missing = [t for t in tars if not os.path.exists(t)]
  if missing:
    raise DataError(f"{nshards_file} announces {count} shards; {missing[0]} does not exist")
  return tars


def wds_image(sample: dict[str, Any], where: str) -> ImageSource:
  for ext in WDS_IMAGE_EXTENSIONS:
    if ext in sample:
      return sample[ext]
  raise DataError(f"{where}: no image ({'/'.join(WDS_IMAGE_EXTENSIONS)})")


def wds_items(
  root: str, split: str, field: str, what: str
) -> Iterator[tuple[str, ImageSource, bytes]]:
  """(where, image, the `field` member's bytes) of every sample of a split, in order; a
  sample without an image or without `field` is a DataError naming it (`what`: the
  field's meaning, e.g. "label")."""
  for tar_path in wds_tars(root, split):
    for key, sample in wds_samples(tar_path):
      where = f"{tar_path}: sample {key!r}"
      image = wds_image(sample, where)
      if field not in sample:
        raise DataError(f"{where}: no .{field} {what}")
      yield where, image, sample[field]


def is_wds(path: str) -> bool:
  return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*", "nshards.txt")))
