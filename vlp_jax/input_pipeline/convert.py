r"""Converts image-text data into the ArrayRecord shards the trainer reads.

  python -m vlp_jax.input_pipeline.convert --from=webdataset \
      --src='/data/cc12m/{00000..01242}.tar' --dst=/data/cc12m_ar --resize_shorter=256
  python -m vlp_jax.input_pipeline.convert --from=json --src=coco_train.json \
      --image_root=/data/coco --dst=/data/coco_ar
  python -m vlp_jax.input_pipeline.convert --from=tfds --tfds_name=coco_captions \
      --tfds_data_dir=~/tensorflow_datasets --split=val --dst=/data/coco_val_ar

Every sample is validated and normalised on the way: the image must decode completely, is
refused from its header when it has more than image_ops.MAX_IMAGE_PIXELS pixels, and is
stored as RGB (alpha composited on white, CMYK, palette, grey and 16-bit converted,
re-encoded as JPEG); RGB JPEG/PNG/WebP bytes that need no resize are kept as they are.
Captions and keys must be non-empty UTF-8. Image files named by path are read only when
they are regular files that resolve within the image root, and no image (file, tar member
or stored bytes) over `max_image_bytes` is read whole. Unusable samples are skipped and
counted by reason.

Shards of `records_per_shard` records are written under a temporary name and renamed
when complete; `convert_state.json` in the destination records, after each shard, where
the source continues and the counts so far. Re-running the same command resumes there and
produces the same shards as an uninterrupted run; `summary.json` is written at the end.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from absl import logging
from tqdm import tqdm

from vlp_jax.input_pipeline import prepare, records, sources

STATE_FILE = "convert_state.json"
SUMMARY_FILE = "summary.json"
SHARD_PREFIX = "data"
_SHARD_PATTERN = re.compile(rf"\.?{SHARD_PREFIX}-\d{{5}}{re.escape(records.SHARD_SUFFIX)}(\.tmp)?")
_CHUNK = 32  # Samples per task sent to a worker process.


class ConvertError(ValueError):
  """The conversion cannot start or cannot finish (bad arguments, a foreign --dst, ...)."""


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  records_per_shard: int = 10_000
  resize_shorter: int = 0  # Downscale so the shorter side has this many pixels; 0: keep.
  jpeg_quality: int = 95  # For images that must be re-encoded.
  max_image_bytes: int = sources.MAX_IMAGE_BYTES  # Larger images are skipped, never read whole.


@dataclasses.dataclass
class ConvertState:
  """Progress of a conversion, saved after each shard and when it completes."""

  config: dict[str, Any]
  position: list[int]  # Where the source continues after the last shard written.
  written: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  unreadable_files: dict[str, str] = dataclasses.field(default_factory=dict)
  shards: list[str] = dataclasses.field(default_factory=list)
  done: bool = False

  @property
  def consumed(self) -> int:
    return self.written + sum(self.skipped.values())


# (key, image bytes, image path, its root, caption, reason already known)
_Payload = tuple[str, bytes | None, str | None, str | None, Any, str | None]
# (record bytes, None, "") or (None, reason, detail)
_Outcome = tuple[bytes | None, str | None, str]


def _prepare(payload: _Payload, options: ConvertOptions) -> _Outcome:
  key, image, image_path, image_root, caption, skip = payload
  try:
    if skip:
      raise prepare.SampleError(skip)
    _check_key(key)
    caption = prepare.prepare_caption(caption)
    if image is None:
      if image_path is None:
        raise prepare.SampleError("missing_image")
      image = prepare.read_image_file(image_path, image_root, options.max_image_bytes)
    elif isinstance(image, bytes) and len(image) > options.max_image_bytes:
      raise prepare.SampleError("image_file_too_large", f"{len(image)} bytes")
    image = prepare.prepare_image(image, options.resize_shorter, options.jpeg_quality)
  except prepare.SampleError as e:
    return None, e.reason, str(e)
  return records.encode_record(key, image, caption), None, ""


def _check_key(key: str) -> None:
  try:
    key.encode("utf-8")  # Lone surrogates: undecodable bytes in a tar member name or path.
  except UnicodeEncodeError as e:
    raise prepare.SampleError("key_not_utf8", repr(key)) from e


def _prepare_chunk(payloads: list[_Payload], options: ConvertOptions) -> list[_Outcome]:
  return [_prepare(p, options) for p in payloads]


def _payload(sample: sources.Sample) -> _Payload:
  skip = sample.skip or ("file_error" if sample.file_error else None)
  return sample.key, sample.image, sample.image_path, sample.image_root, sample.caption, skip


def _prepare_all(
  samples: Iterator[sources.Sample], options: ConvertOptions, num_workers: int
) -> Iterator[tuple[sources.Sample, _Outcome]]:
  """Prepares samples in order, in `num_workers` processes when > 0."""
  if num_workers <= 0:
    for sample in samples:
      yield sample, _prepare(_payload(sample), options)
    return
  # spawn, not fork: the reader may hold TensorFlow's threads, which do not survive a fork.
  pool = concurrent.futures.ProcessPoolExecutor(
    num_workers, mp_context=multiprocessing.get_context("spawn")
  )
  in_flight: collections.deque = collections.deque()
  try:
    while chunk := list(itertools.islice(samples, _CHUNK)):
      future = pool.submit(_prepare_chunk, [_payload(s) for s in chunk], options)
      in_flight.append((chunk, future))
      # A bounded window: reading never runs ahead of the workers by more than this.
      if len(in_flight) >= 4 * num_workers:
        chunk, future = in_flight.popleft()
        yield from zip(chunk, future.result())
    while in_flight:
      chunk, future = in_flight.popleft()
      yield from zip(chunk, future.result())
  finally:
    pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------- the conversion


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
  before, after = _flatten(old), _flatten(new)
  lines = []
  for key in sorted(set(before) | set(after)):
    if before.get(key) != after.get(key):
      was, now = repr(before.get(key)), repr(after.get(key))
      lines.append(f"  {key}: was {was[:200]}, now {now[:200]}")
  return "\n".join(lines)


def _save_state(dst: str, state: ConvertState) -> None:
  path = os.path.join(dst, STATE_FILE)
  with open(f"{path}.tmp", "w") as f:
    json.dump(dataclasses.asdict(state), f, indent=1)
  os.replace(f"{path}.tmp", path)


def _start(dst: str, config: dict[str, Any]) -> ConvertState:
  """A fresh state in an empty `dst`, or the saved one of the same conversion there."""
  os.makedirs(dst, exist_ok=True)
  state_path = os.path.join(dst, STATE_FILE)
  if not os.path.exists(state_path):
    if os.listdir(dst):
      raise ConvertError(
        f"--dst {dst} is not empty and holds no conversion to resume ({STATE_FILE} is "
        "missing); choose a new or empty directory"
      )
    state = ConvertState(config=config, position=[0, 0])
    _save_state(dst, state)
    return state
  with open(state_path) as f:
    state = ConvertState(**json.load(f))
  if state.config != config and state.shards:
    raise ConvertError(
      f"--dst {dst} holds a conversion with different arguments:\n"
      f"{_describe_difference(state.config, config)}\n"
      "Re-run with the original arguments to resume it, or choose a new --dst."
    )
  if state.config != config:  # A conversion that wrote nothing yet: nothing to keep.
    state = ConvertState(config=config, position=[0, 0])
    _save_state(dst, state)
  # Shards renamed into place after the last saved state, and temporary files, are redone.
  for name in os.listdir(dst):
    if _SHARD_PATTERN.fullmatch(name) and name not in state.shards:
      os.remove(os.path.join(dst, name))
  return state


def _summary(state: ConvertState, seconds: float) -> dict[str, Any]:
  return {
    "written": state.written,
    "skipped": dict(sorted(state.skipped.items())),
    "skipped_total": sum(state.skipped.values()),
    "unreadable_files": state.unreadable_files,
    "shards": state.shards,
    "source": state.config["source"],
    "options": state.config["options"],
    "seconds_this_run": round(seconds, 1),
  }


class _Output:
  """The shards of a conversion; its state is saved as each shard is completed."""

  def __init__(self, dst: str, state: ConvertState, records_per_shard: int):
    self.dst, self.state, self.records_per_shard = dst, state, records_per_shard
    self.position, self.written = state.position, state.written
    self.skipped = collections.Counter(state.skipped)
    self.unreadable = dict(state.unreadable_files)
    self.writer: records.ShardWriter | None = None
    self.in_shard = 0
    self.log_shards = False

  def add(
    self, sample: sources.Sample, record: bytes | None, reason: str | None, detail: str
  ) -> bool:
    """Writes or counts one prepared sample; False for a note about an unreadable file."""
    self.position = list(sample.position)
    if sample.file_error:
      self.unreadable[sample.key] = sample.file_error
      logging.warning("Skipping %s: %s", sample.key, sample.file_error)
      return False
    if record is None:
      self.skipped[reason] += 1
      if self.skipped[reason] <= 3:
        logging.warning("Skipping %r: %s (later ones are only counted)", sample.key, detail)
      return True
    if self.writer is None:
      name = f"{SHARD_PREFIX}-{len(self.state.shards):05d}{records.SHARD_SUFFIX}"
      self.writer = records.ShardWriter(os.path.join(self.dst, name))
    self.writer.write(record)
    self.written += 1
    self.in_shard += 1
    if self.in_shard == self.records_per_shard:
      self.finish_shard()
    return True

  def finish_shard(self) -> None:
    """Completes the shard in progress, if any, then saves where the source continues."""
    if self.writer is not None:
      self.writer.close()
      self.state.shards.append(os.path.basename(self.writer.path))
      self.writer, self.in_shard = None, 0
    self.state.position, self.state.written = list(self.position), self.written
    self.state.skipped, self.state.unreadable_files = dict(self.skipped), dict(self.unreadable)
    _save_state(self.dst, self.state)
    if self.log_shards:
      logging.info(
        "%d shards: %d records written, %d skipped.",
        len(self.state.shards),
        self.written,
        sum(self.skipped.values()),
      )

  def abort(self) -> None:
    if self.writer is not None:
      # Already handling the error that stopped us: that one must propagate, not this one.
      with contextlib.suppress(Exception):
        self.writer.abort()


def convert(
  source: sources.Source,
  dst: str,
  options: ConvertOptions = ConvertOptions(),
  *,
  num_workers: int = 0,
  progress: bool | None = None,
) -> ConvertState:
  """Converts `source` into ArrayRecord shards in `dst`, resuming a conversion left there.

  `progress`: show a progress bar (None: only on a terminal). Returns the final state;
  raises ConvertError when `dst` holds something else or nothing could be converted.
  """
  if options.records_per_shard <= 0:
    raise ConvertError(f"records_per_shard must be positive, not {options.records_per_shard}")
  if options.max_image_bytes <= 0:
    raise ConvertError(f"max_image_bytes must be positive, not {options.max_image_bytes}")
  # Through JSON once so it compares equal to a saved copy (tuples become lists).
  config = json.loads(
    json.dumps({"source": source.describe(), "options": dataclasses.asdict(options)})
  )
  state = _start(dst, config)
  if state.done:
    logging.info("%s already holds this conversion, complete: nothing to do.", dst)
    return state
  if state.shards:
    logging.info(
      "Resuming after %d shards (%d records written) at file %d, sample %d.",
      len(state.shards),
      state.written,
      *state.position,
    )
  start_time, start_consumed = time.time(), state.consumed
  output = _Output(dst, state, options.records_per_shard)
  samples = source.read(tuple(state.position), max_image_bytes=options.max_image_bytes)
  bar = tqdm(
    total=source.count(), initial=state.consumed, unit=" samples", disable=_no_bar(progress)
  )
  output.log_shards = bar.disable
  try:
    with bar:
      for sample, outcome in _prepare_all(samples, options, num_workers):
        if output.add(sample, *outcome):
          bar.update()
          if bar.n % 1000 == 0:
            bar.set_postfix(written=output.written, skipped=sum(output.skipped.values()))
      output.finish_shard()
  except BaseException:
    output.abort()  # The shard in progress is redone on resume.
    raise
  state = output.state
  if not state.written:
    raise ConvertError(
      f"no records could be converted: skipped {state.skipped}, unreadable files "
      f"{state.unreadable_files}"
    )
  state.done = True
  _save_state(dst, state)
  seconds = time.time() - start_time
  with open(os.path.join(dst, SUMMARY_FILE), "w") as f:
    json.dump(_summary(state, seconds), f, indent=2)
  logging.info(
    "Wrote %d records in %d shards to %s; skipped %d %s; %.0f samples/s this run.",
    state.written,
    len(state.shards),
    dst,
    sum(state.skipped.values()),
    dict(sorted(state.skipped.items())),
    (state.consumed - start_consumed) / max(seconds, 1e-9),
  )
  return state


def _no_bar(progress: bool | None) -> bool | None:
  return None if progress is None else not progress  # tqdm: None disables off a terminal.


# ---------------------------------------------------------------- command line


def create_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m vlp_jax.input_pipeline.convert",
    description="Convert image-text data to vlp_jax's ArrayRecord shards.",
  )
  parser.add_argument("--from", dest="kind", required=True, choices=sources.FORMATS)
  parser.add_argument(
    "--src",
    default="",
    help="webdataset/arrow: a directory, glob, {000..009} pattern or comma list of files; "
    "json/csv: the annotation file",
  )
  parser.add_argument("--dst", required=True, help="output directory (new, empty, or resumed)")
  parser.add_argument(
    "--image_root",
    default="",
    help="json/csv: base of relative image paths, and the directory every image must "
    "resolve within (symlinks followed); default: the annotation file's directory",
  )
  parser.add_argument(
    "--allow_outside_root",
    action="store_true",
    help="json/csv: also read images that resolve outside --image_root",
  )
  keys = ", ".join(f"{k}: {'/'.join(v)}" for k, v in sources.DEFAULT_KEYS.items())
  parser.add_argument("--image_key", default="", help=f"image field; defaults {keys}")
  parser.add_argument("--caption_key", default="", help="caption field (see --image_key)")
  parser.add_argument("--id_key", default="", help="record key field (see --image_key)")
  parser.add_argument("--separator", default="", help=r"csv: default ',' for .csv, else '\t'")
  parser.add_argument("--tfds_name", default="", help="tfds: dataset name, e.g. coco_captions")
  parser.add_argument("--tfds_data_dir", default="", help="tfds: prepared data directory")
  parser.add_argument("--split", default="train", help="tfds: split, e.g. train or val[:1000]")
  parser.add_argument("--resize_shorter", type=int, default=0, help="downscale to this side")
  parser.add_argument("--records_per_shard", type=int, default=10_000)
  parser.add_argument("--jpeg_quality", type=int, default=95)
  parser.add_argument(
    "--max_image_bytes",
    type=int,
    default=sources.MAX_IMAGE_BYTES,
    help="larger image files (and tar caption files) are skipped unread",
  )
  parser.add_argument("--num_workers", type=int, default=0, help="processes decoding images")
  return parser


def main(argv: list[str] | None = None) -> None:
  args = create_parser().parse_args(argv)
  from vlp_jax import cli  # Imports JAX: only for the command line.

  cli.log_to_absl_at_info()
  try:
    source = sources.create_source(
      args.kind,
      args.src,
      image_root=args.image_root,
      allow_outside_root=args.allow_outside_root,
      keys=(args.image_key, args.caption_key, args.id_key),
      separator=codecs.decode(args.separator, "unicode_escape"),  # '\t' typed as two chars.
      tfds_name=args.tfds_name,
      tfds_data_dir=os.path.expanduser(args.tfds_data_dir),
      split=args.split,
    )
    options = ConvertOptions(
      args.records_per_shard, args.resize_shorter, args.jpeg_quality, args.max_image_bytes
    )
    convert(source, args.dst, options, num_workers=args.num_workers)
  except (sources.SourceError, ConvertError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
