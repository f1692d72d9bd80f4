"""One sample's validation and normalisation for `convert`: captions to stripped UTF-8
text, images to bytes the trainer decodes to the right RGB pixels (or kept as they are),
image files read within their root; an unusable sample raises SampleError naming why."""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image

from vlp_jax.input_pipeline import image_files, image_ops

# Encoded bytes of these formats are kept as they are when already RGB and not resized.
_KEPT_FORMATS = ("JPEG", "PNG", "WEBP")


class SampleError(ValueError):
  """A sample is unusable; `reason` is the name it is counted under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def prepare_caption(value: Any) -> str | list[str]:
  """Raw caption (str, bytes, or a list of those) -> stripped UTF-8 text; lists stay lists."""
  if value is None:
    raise SampleError("missing_caption")
  if isinstance(value, (list, tuple)):
    captions = [_caption_text(v) for v in value]
    captions = [c for c in captions if c]
    if not captions:
      raise SampleError("empty_caption")
    return captions
  caption = _caption_text(value)
  if not caption:
    raise SampleError("empty_caption")
  return caption


def _caption_text(value: Any) -> str:
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise SampleError("caption_not_utf8", str(e)) from e
  if not isinstance(value, str):
    raise SampleError("bad_caption_type", type(value).__name__)
  try:
    value.encode("utf-8")  # Lone surrogates: bytes a CSV reader could not decode.
  except UnicodeEncodeError as e:
    raise SampleError("caption_not_utf8", str(e)) from e
  return value.strip()


def _target_size(width: int, height: int, shorter: int) -> tuple[int, int] | None:
  """The size with the shorter side at `shorter` (aspect kept), or None: never upscale."""
  if not shorter or min(width, height) <= shorter:
    return None
  if width <= height:
    return shorter, max(1, round(height * shorter / width))
  return max(1, round(width * shorter / height)), shorter


def prepare_image(data: bytes, resize_shorter: int = 0, jpeg_quality: int = 95) -> bytes:
  """Encoded image -> bytes the trainer decodes to the right RGB pixels; SampleError if not."""
  if not data:
    raise SampleError("empty_image")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # We refuse them below.
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise SampleError("image_too_large", str(e)) from e
  except (OSError, ValueError, SyntaxError) as e:
    raise SampleError("undecodable_image", str(e)) from e
  width, height = image.size
  # Only the header has been read so far: a decompression bomb is refused before decoding.
  if width * height > image_ops.MAX_IMAGE_PIXELS:
    raise SampleError("image_too_large", f"{width}x{height} pixels")
  if not width or not height:
    raise SampleError("undecodable_image", f"{width}x{height} pixels")
  target = _target_size(width, height, resize_shorter)
  try:
    if (
      target is None
      and image.format in _KEPT_FORMATS
      and image.mode == "RGB"
      and "transparency" not in image.info
    ):
      if image.format == "JPEG":
        # A reduced-scale decode still reads every byte, so it proves the file complete.
        image.draft(None, (max(1, width // 8), max(1, height // 8)))
      image.load()
      return data
    if target is not None and image.format == "JPEG":
      image.draft(None, target)  # Decode at the smallest DCT scale still >= the target.
    image = image_ops.to_rgb(image)
    if target is not None:
      image = image.resize(target, Image.BICUBIC)
  except (OSError, ValueError, SyntaxError) as e:
    raise SampleError("undecodable_image", str(e)) from e
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=jpeg_quality)
  return buffer.getvalue()


def read_image_file(path: str, root: str | None, max_bytes: int) -> bytes:
  """The bytes of the regular file `path` (image_files.read_image_file, the reader every
  path to user images shares); SampleError if it resolves outside the real directory
  `root` (None: anywhere), is not a regular file, or holds over `max_bytes`."""
  try:
    return image_files.read_image_file(path, root, max_bytes)
  except image_files.ImageFileError as e:
    raise SampleError(e.reason, e.detail) from e
