"""The on-disk record format: one msgpack map per image-text pair in ArrayRecord shards.

A record is {"key": str, "image": encoded image bytes, "caption": str | list[str]} plus
optional fields (e.g. "negatives" for compositional probes). Readers validate and raise
`RecordError` naming the problem; the pipeline turns that into a skipped record.
"""

from __future__ import annotations

import dataclasses
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
  check_shards(paths)
  return paths


class ShardError(ValueError):
  """A shard file is not a readable ArrayRecord file."""


def check_shards(paths: Sequence[str]) -> None:
  """Opens each shard's index (about 1 ms each); raises `ShardError` naming an unreadable one.

  array_record's own error ("Corrupted Riegeli/records file ...") does not say which file.
  """
  from array_record.python.array_record_module import ArrayRecordReader

  for path in paths:
    try:
      reader = ArrayRecordReader(path, "readahead_buffer_size:0")
      reader.num_records()
      reader.close()
    except (RuntimeError, OSError, ValueError) as e:
      raise ShardError(f"unreadable ArrayRecord shard {path}: {e}") from e


class ShardWriter:
  """Writes one shard under a hidden temporary name; `close()` renames it into place, so
  neither a reader's glob nor a resumed writer ever sees a half-written shard."""

  def __init__(self, path: str):
    from array_record.python.array_record_module import ArrayRecordWriter

    self.path = path
    self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    # group_size:1 as in write_shards: cheap random access for the global shuffle.
    self._writer = ArrayRecordWriter(self.tmp, "group_size:1")

  def write(self, record: bytes) -> None:
    self._writer.write(record)

  def close(self) -> None:
    self._writer.close()
    os.replace(self.tmp, self.path)

  def abort(self) -> None:
    self._writer.close()
    os.remove(self.tmp)


def write_shard(path: str, records: Iterable[bytes]) -> None:
  """Writes `records` to one shard at `path`, which appears only once complete."""
  writer = ShardWriter(path)
  try:
    for record in records:
      writer.write(record)
  except BaseException:
    writer.abort()
    raise
  writer.close()


@dataclasses.dataclass(frozen=True)
class ShardSet:
  """One set of shards and its sampling weight in a training mixture."""

  spec: str
  shards: tuple[str, ...]
  weight: float = 1.0


def _split_weight(part: str) -> tuple[str, float | None]:
  """ "path:0.7" -> ("path", 0.7); a colon not followed by a number is part of the path."""
  path, sep, tail = part.rpartition(":")
  if sep and path:
    try:
      return path, float(tail)
    except ValueError:
      pass
  return part, None


def resolve_mixture(spec: str | Sequence[str]) -> list[ShardSet]:
  """Training data spec -> shard sets with weights.

  "dir_a:0.7,dir_b:0.3" or ["dir_a:0.7", "dir_b:0.3"] mix two sets; "dir_a,dir_b" (no
  weights) is one set made of both. Weights are relative; they need not sum to 1.
  """
  parts = [spec] if isinstance(spec, str) else list(spec)
  parts = [p.strip() for part in parts for p in str(part).split(",") if p.strip()]
  if not parts:
    raise FileNotFoundError("no shards given")
  split = [_split_weight(p) for p in parts]
  weighted = [w is not None for _, w in split]
  if not any(weighted) and isinstance(spec, str):
    return [ShardSet(spec, tuple(resolve_shards(spec)))]
  if not all(weighted) and isinstance(spec, str):
    raise ValueError(f"give every part of {spec!r} a weight (path:weight) or none")
  sets = []
  for path, weight in split:
    weight = 1.0 if weight is None else weight
    if not 0 < weight < float("inf"):
      raise ValueError(f"weight {weight} of {path!r} must be a positive number")
    sets.append(ShardSet(path, tuple(resolve_shards(path)), weight))
  return sets


def replace_dir_atomically(tmp_dir: str, final_dir: str) -> None:
  """Moves a fully written `tmp_dir` to `final_dir`; a concurrent writer that won keeps its copy."""
  try:
    os.rename(tmp_dir, final_dir)
  except OSError:
    if not os.path.isdir(final_dir):
      raise
    shutil.rmtree(tmp_dir, ignore_errors=True)
