"""Image bytes -> pixels for the pipelines and converters: header-only sizes, decoding
(JPEGs by libjpeg-turbo, shrunk in the DCT), RGB normalisation, crop boxes and resizes.
Every decoder refuses images over MAX_IMAGE_PIXELS before decoding them."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import simplejpeg
from PIL import Image

# One OpenCV thread per process: grain already runs one worker process per core.
cv2.setNumThreads(1)


# Decoding refuses images larger than this (decompression bombs); PIL warns at ~89M.
MAX_IMAGE_PIXELS = 64_000_000


class ImageError(ValueError):
  """An image cannot be decoded."""


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL image -> 8-bit RGB: transparency composited on white, 16-bit greys scaled."""
  if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    # convert() clips these at 255, turning most of a 16-bit image white: rescale instead.
    grey = np.asarray(image, dtype=np.float32) / 257
    image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
    # Composite transparent areas on white rather than on arbitrary hidden colours.
    rgba = image.convert("RGBA")
    image = Image.new("RGB", rgba.size, (255, 255, 255))
    image.paste(rgba, mask=rgba.getchannel("A"))
  return image.convert("RGB")


def open_image(data: bytes) -> Image.Image:
  """Encoded bytes -> RGB PIL image, refusing oversized images before decoding pixels."""
  try:
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_IMAGE_PIXELS:
      raise ImageError(f"image of {image.width}x{image.height} pixels exceeds {MAX_IMAGE_PIXELS}")
    image = to_rgb(image)
    image.load()
  except ImageError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from e
  return image


def random_resized_crop_box(
  width: int,
  height: int,
  rng: np.random.Generator,
  scale: tuple[float, float],
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Inception-style crop box (left, top, right, bottom), torchvision's algorithm."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  return center_crop_box(width, height)


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  if image.format == "JPEG":
    # Decode JPEGs at a reduced scale when they are much larger than needed.
    crop_side = min(box[2] - box[0], box[3] - box[1])
    image.draft("RGB", (image.width * size // crop_side, image.height * size // crop_side))
  return np.asarray(image.resize((size, size), Image.BICUBIC, box=box), dtype=np.uint8)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
  """(width, height) of a YCbCr or grey JPEG that libjpeg-turbo decodes to RGB, else None."""
  if not data.startswith(b"\xff\xd8"):
    return None
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError:
    return None  # Let PIL try, and name the problem.
  return (width, height) if colorspace in ("YCbCr", "Gray") else None


def image_dimensions(data: bytes) -> tuple[int, int]:
  """(width, height) from the header alone; refuses decompression bombs."""
  size = _jpeg_size(data)
  if size is None:
    try:
      size = Image.open(io.BytesIO(data)).size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      raise ImageError(f"cannot read image header ({type(e).__name__}: {e})") from e
  if size[0] * size[1] > MAX_IMAGE_PIXELS:
    raise ImageError(f"image of {size[0]}x{size[1]} pixels exceeds {MAX_IMAGE_PIXELS}")
  return size


def decode_pixels(data: bytes, max_shrink: float = 1.0) -> np.ndarray:
  """Encoded image -> RGB uint8 (H, W, 3), shrunk by up to `max_shrink` while decoding.

  JPEGs go through simplejpeg (libjpeg-turbo, ~1.3x PIL's speed) and shrink by 1/2^k in
  the DCT (free, antialiased); other formats and CMYK JPEGs go through PIL at full size.
  Oversized and truncated images raise ImageError.
  """
  size = _jpeg_size(data)
  if size is None:
    return np.asarray(open_image(data))
  width, height = size
  if width * height > MAX_IMAGE_PIXELS:
    raise ImageError(f"image of {width}x{height} pixels exceeds {MAX_IMAGE_PIXELS}")
  # Powers of two only: libjpeg-turbo's other scales are slower than a full decode.
  factor = 1
  while factor < 8 and 2 * factor <= max_shrink:
    factor *= 2
  try:
    return simplejpeg.decode_jpeg(
      data,
      colorspace="RGB",
      min_width=-(-width // factor),
      min_height=-(-height // factor),
      min_factor=factor,
    )
  except ValueError as e:
    raise ImageError(f"cannot decode JPEG ({e})") from e


def check_image(data: bytes) -> None:
  """Raises ImageError unless `data` decodes completely (JPEGs cheaply, at 1/8 scale)."""
  width, height = image_dimensions(data)
  decode_pixels(data, max_shrink=min(width, height) / 8)


def crop_resize_pixels(
  pixels: np.ndarray, box: tuple[float, float, float, float], size: int
) -> np.ndarray:
  """Crops `box` (left, top, right, bottom) and resizes it to size x size.

  Bilinear, as tf.data and big_vision do; area averaging when shrinking by 2x or more,
  where bilinear would alias (JPEGs rarely get there: the decoder already shrank them).
  OpenCV's bilinear kernel is ~4x faster than PIL's bicubic.
  """
  left, top, right, bottom = (round(v) for v in box)
  crop = pixels[top:bottom, left:right]
  shrink = min(crop.shape[0], crop.shape[1]) / size
  interpolation = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR
  return cv2.resize(crop, (size, size), interpolation=interpolation)
