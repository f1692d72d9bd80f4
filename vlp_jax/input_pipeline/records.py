"""The on-disk record format: one msgpack map per image-text pair in ArrayRecord shards.

A record is {"key": str, "image": encoded image bytes, "caption": str | list[str]} plus
optional fields (e.g. "negatives" for compositional probes). Readers validate and raise
`RecordError` naming the problem; the pipeline turns that into a skipped record.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

SHARD_SUFFIX = ".array_record"


class RecordError(ValueError):
  """A record cannot be decoded or fails validation."""


def encode_record(key: str, image: bytes, caption: str | Sequence[str], **extra: Any) -> bytes:
  return msgpack.packb({"key": key, "image": image, "caption": caption, **extra}, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """Bytes -> record dict with `captions` normalised to a non-empty list of str."""
  try:
    record = msgpack.unpackb(data, raw=False)
  except (ValueError, msgpack.UnpackException, UnicodeDecodeError) as e:
    raise RecordError(f"not a msgpack record ({type(e).__name__}: {e})") from e
  if not isinstance(record, dict):
    raise RecordError(f"record is a {type(record).__name__}, not a map")
  image, caption = record.get("image"), record.get("caption")
  if not isinstance(image, bytes) or not image:
    raise RecordError("record has no image bytes")
  captions = [caption] if isinstance(caption, str) else caption
  if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
    raise RecordError(f"record caption has type {type(caption).__name__}")
  captions = [c for c in captions if c.strip()]
  if not captions:
    raise RecordError("record has an empty caption")
  record["captions"] = captions
  return record


def shard_name(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def write_shards(records: Iterable[bytes], dst_dir: str, prefix: str, num_shards: int) -> list[str]:
  """Writes records round-robin into `num_shards` ArrayRecord files in `dst_dir`."""
  from array_record.python.array_record_module import ArrayRecordWriter

  os.makedirs(dst_dir, exist_ok=True)
  paths = [os.path.join(dst_dir, shard_name(prefix, i, num_shards)) for i in range(num_shards)]
  # group_size:1 keeps random access cheap, which the global shuffle relies on.
  writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
  try:
    for i, record in enumerate(records):
      writers[i % num_shards].write(record)
  finally:
    for w in writers:
      w.close()
  return paths


def resolve_shards(spec: str) -> list[str]:
  """A directory, a glob pattern, a file, or a comma-separated list of those -> shard paths."""
  paths: list[str] = []
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    if os.path.isdir(part):
      found = sorted(glob.glob(os.path.join(part, f"*{SHARD_SUFFIX}*")))
    elif any(c in part for c in "*?["):
      found = sorted(glob.glob(part))
    else:
      found = [part] if os.path.isfile(part) else []
    if not found:
      raise FileNotFoundError(f"no ArrayRecord shards found at {part!r}")
    paths.extend(found)
  if not paths:
    raise FileNotFoundError(f"no ArrayRecord shards in {spec!r}")
  return paths


def replace_dir_atomically(tmp_dir: str, final_dir: str) -> None:
  """Moves a fully written `tmp_dir` to `final_dir`; a concurrent writer that won keeps its copy."""
  try:
    os.rename(tmp_dir, final_dir)
  except OSError:
    if not os.path.isdir(final_dir):
      raise
    shutil.rmtree(tmp_dir, ignore_errors=True)
