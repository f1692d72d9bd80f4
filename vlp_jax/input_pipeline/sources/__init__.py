"""Readers of the image-text formats users have, for `convert`.

Each reader yields `Sample`s in a fixed order, each carrying the `Position` just after it
(which file, which sample within it), so a conversion can stop after any sample and
resume there. Readers only gather raw fields (image bytes or a path to them, caption as
stored); `convert` validates and normalises them, possibly in worker processes, and opens
image paths itself (regular files within the image root, read up to a byte limit). A
reader never writes anything: tar members in particular are read into memory, never
extracted, and none larger than the byte limit.

  webdataset  img2dataset tar shards: {key}.jpg|jpeg|png|webp, {key}.txt, {key}.json
  json        ALBEF/LilT lists: [{"image": path, "caption": str | [str, ...]}, ...]
  csv         open_clip's CSV/TSV: image path and caption columns (filepath, title)
  tfds        a prepared TFDS dataset with image and caption features (coco_captions)
  arrow       ViLT/VLC pyarrow files: `image` bytes and `caption` list-of-str columns
"""

from vlp_jax.input_pipeline.sources.annotations import CsvSource, JsonListSource
from vlp_jax.input_pipeline.sources.base import (
  DEFAULT_KEYS,
  FORMATS,
  IMAGE_EXTENSIONS,
  MAX_IMAGE_BYTES,
  Position,
  Sample,
  Source,
  SourceError,
  expand_braces,
  resolve_files,
)
from vlp_jax.input_pipeline.sources.tables import ArrowSource, TfdsSource
from vlp_jax.input_pipeline.sources.webdataset import WebDatasetSource

__all__ = [
  "DEFAULT_KEYS",
  "FORMATS",
  "IMAGE_EXTENSIONS",
  "MAX_IMAGE_BYTES",
  "ArrowSource",
  "CsvSource",
  "JsonListSource",
  "Position",
  "Sample",
  "Source",
  "SourceError",
  "TfdsSource",
  "WebDatasetSource",
  "create_source",
  "expand_braces",
  "resolve_files",
]


def create_source(
  kind: str,
  src: str = "",
  *,
  image_root: str = "",
  allow_outside_root: bool = False,
  keys: tuple[str, str, str] = ("", "", ""),
  separator: str = "",
  tfds_name: str = "",
  tfds_data_dir: str = "",
  split: str = "train",
) -> Source:
  """The reader for format `kind` (one of FORMATS); empty `keys` take the format's defaults."""
  if kind != "tfds" and not src:
    raise SourceError(f"--src is required for --from={kind}")
  if kind == "webdataset":
    return WebDatasetSource(src)
  if kind == "json":
    return JsonListSource(src, image_root, keys, allow_outside_root=allow_outside_root)
  if kind == "csv":
    return CsvSource(src, image_root, keys, separator, allow_outside_root=allow_outside_root)
  if kind == "tfds":
    if not tfds_name:
      raise SourceError("--tfds_name is required for --from=tfds")
    return TfdsSource(tfds_name, tfds_data_dir, split, keys)
  if kind == "arrow":
    return ArrowSource(src, keys)
  raise SourceError(f"unknown format {kind!r}; expected one of {', '.join(FORMATS)}")
