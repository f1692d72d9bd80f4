"""Dataset specs, file helpers and readers for retrieval sets in their official formats.

A dataset is named on the command line as `path[,key=value...]` (several separated by
";"), e.g. `--data.zeroshot_retrieval=/data/coco/dataset_coco.json,images=/data/coco`.

Retrieval: Karpathy-split JSON (`{"images": [{"filepath", "filename", "split",
"sentences": [{"raw"}]}]}`), COCO caption JSON (`images` + `annotations`, as
CLIP_benchmark's `coco_test_karpathy.json`), the ALBEF/BLIP list (`[{"image",
"caption"}]`), CLIP_benchmark's Flickr30k txt (`image,caption` lines), CLIP_benchmark
webdataset directories (`<split>/nshards.txt`, `<split>/0.tar`...) and our ArrayRecord
shards. Classification sets: classification_readers.py.

Malformed input raises `DataError` naming the file and the line or key.
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

import grain
from absl import logging
from PIL import Image

from vlp_jax.evaluation.embedding import DataError, ImageRef, ImageSource, RecordImage
from vlp_jax.input_pipeline import image_files, image_ops, records, task_data

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


def is_wds(path: str) -> bool:
  return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*", "nshards.txt")))


def read_wds_retrieval(root: str, split: str = "test", name: str = "") -> RetrievalSet:
  images: list[ImageSource] = []
  captions = []
  for tar_path in wds_tars(root, split):
    for key, sample in wds_samples(tar_path):
      where = f"{tar_path}: sample {key!r}"
      images.append(wds_image(sample, where))
      if "txt" not in sample:
        raise DataError(f"{where}: no .txt captions")
      captions.append(_captions(sample["txt"].decode("utf-8").splitlines(), where))
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
