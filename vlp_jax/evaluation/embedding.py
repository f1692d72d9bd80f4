"""Embeds images and texts on the device mesh with a method's prediction functions.

Images come as `ImageSource`s (a file, encoded bytes or an ArrayRecord record, with an
optional crop box), decoded by the input pipeline's functions and preprocessed as open_clip's
eval transform does (`load_pixels`), so the embeddings equal open_clip's / CLIP_benchmark's.

Every step has the same static global batch (padding rows carry row index -1), so
nothing recompiles. Process p loads rows [p * local, (p + 1) * local) of each global
batch; the embeddings are gathered to every host and put back in order by row index.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from vlp_jax import preemption, sharding
from vlp_jax.input_pipeline.image_sources import ImageSource


class Tokenizer(Protocol):
  """What evaluation needs of a tokenizer: texts -> (len(texts), context_length) int32."""

  context_length: int

  def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def load_pixels(source: ImageSource, image_size: int) -> np.ndarray:
  """Decode -> shorter side to S (PIL bicubic) -> center S x S crop: uint8 (S, S, 3).

  open_clip's eval transform (torchvision Resize(S) + CenterCrop(S)) with torchvision's
  rounding: the longer side becomes int(S * long / short), the crop offset
  round((side - S) / 2) (Python's, half to even). Cropping the square first and resizing
  it (pipeline.crop_resize) samples other source positions on non-square images.
  """
  image = source.open()
  width, height = image.size
  short, long = min(width, height), max(width, height)
  new_long = int(image_size * long / short)
  size = (image_size, new_long) if width <= height else (new_long, image_size)
  if size != image.size:
    image = image.resize(size, Image.BICUBIC)
  left, top = (round((side - image_size) / 2.0) for side in size)
  return np.asarray(image.crop((left, top, left + image_size, top + image_size)), np.uint8)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
  """A tqdm bar on process 0 when enabled, otherwise a no-op with the same methods."""
  if enabled and jax.process_index() == 0:
    from tqdm import tqdm  # tensorflow-datasets depends on it; only the CLI draws bars.

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
  return _NoBar()


class _NoBar:
  def update(self, n: int = 1) -> None:
    pass

  def close(self) -> None:
    pass


# (params, inputs) -> (B, D) embeddings: "embed_image" takes uint8 (B, S, S, 3) images,
# "embed_text" int32 (B, T) tokens (a method's predict functions of those names).
EmbedFn = Callable[[Any, jax.Array], jax.Array]


class Embedder:
  """Normalised embeddings of image and text lists, computed on the mesh by a method's
  `embed_image` / `embed_text` prediction functions (either may be absent)."""

  def __init__(
    self,
    predict_fns: dict[str, EmbedFn],
    mesh: Mesh,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    image_size: int,
    read_threads: int,
    show_progress: bool = False,
  ):
    divisor = jax.process_count() * sharding.batch_size_divisor(mesh)
    if batch_size <= 0 or batch_size % divisor:
      raise ValueError(
        f"config.eval.batch_size={batch_size} is not a positive multiple of the number of "
        f"batch shards ({divisor})"
      )
    self.mesh = mesh
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.local_batch = batch_size // jax.process_count()
    self.image_size = image_size
    self.read_threads = read_threads
    self.show_progress = show_progress
    out_sharding = sharding.batch_sharding(mesh)

    def encoder(name: str, field: str) -> Callable | None:
      if name not in predict_fns:
        return None
      embed = predict_fns[name]

      def encode(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"embedding": embed(params, batch[field]), "row": batch["row"]}

      return jax.jit(encode, out_shardings=out_sharding)

    self._encode_images = encoder("embed_image", "image")
    self._encode_texts = encoder("embed_text", "tokens")

  def _local_slice(self, step: int) -> tuple[int, int]:
    start = step * self.batch_size + jax.process_index() * self.local_batch
    return start, start + self.local_batch

  def _rows(self, step: int, count: int) -> np.ndarray:
    start, stop = self._local_slice(step)
    rows = np.arange(start, stop, dtype=np.int32)
    return np.where(rows < count, rows, -1)

  def _run(
    self,
    encode: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]] | None,
    params: Any,
    batches: Iterator[dict[str, np.ndarray]],
    count: int,
    desc: str,
  ) -> np.ndarray:
    if encode is None:
      raise ValueError(f"the method has no prediction function for {desc}")
    steps = math.ceil(count / self.batch_size)
    bar = progress_bar(steps, desc, self.show_progress)
    outputs = []
    for batch in itertools.islice(batches, steps):
      preemption.check_stop()  # A SIGTERM stops the evaluation between batches.
      # Dispatch is asynchronous: the host prepares the next batch while this one runs.
      outputs.append(encode(params, sharding.host_to_global(batch, self.mesh)))
      bar.update()
    bar.close()
    if not outputs:
      return np.zeros((0, 0), np.float32)
    gathered = multihost_utils.process_allgather(outputs, tiled=True)
    embeddings = np.concatenate([np.asarray(o["embedding"], np.float32) for o in gathered])
    rows = np.concatenate([np.asarray(o["row"]) for o in gathered])
    valid = rows >= 0
    result = np.zeros((count, embeddings.shape[1]), np.float32)
    result[rows[valid]] = embeddings[valid]
    return result

  def texts(self, params: Any, texts: Sequence[str], desc: str = "texts") -> np.ndarray:
    """(len(texts), D) float32 embeddings, in order."""
    texts = list(texts)

    def batches() -> Iterator[dict[str, np.ndarray]]:
      for step in itertools.count():
        start, stop = self._local_slice(step)
        mine = texts[start:stop]
        tokens = np.zeros((self.local_batch, self.tokenizer.context_length), np.int32)
        if mine:
          tokens[: len(mine)] = self.tokenizer(mine)
        yield {"tokens": tokens, "row": self._rows(step, len(texts))}

    return self._run(self._encode_texts, params, batches(), len(texts), desc)

  def images(
    self,
    params: Any,
    images: Iterable[ImageSource],
    count: int | None = None,
    desc: str = "images",
  ) -> np.ndarray:
    """(count, D) float32 embeddings of `images` (any iterable: read once, in order).

    A source that cannot be read raises `DataError` naming it: a wrong image root must
    not silently change a benchmark.
    """
    if count is None:
      count = len(images)  # type: ignore[arg-type]
    size = self.image_size

    def batches() -> Iterator[dict[str, np.ndarray]]:
      source = iter(images)
      with concurrent.futures.ThreadPoolExecutor(max(1, self.read_threads)) as pool:

        def submit(step: int) -> list[concurrent.futures.Future]:
          chunk = list(itertools.islice(source, self.batch_size))
          start = jax.process_index() * self.local_batch
          mine = chunk[start : start + self.local_batch]
          return [pool.submit(load_pixels, s, size) for s in mine]

        pending = submit(0)
        for step in itertools.count():
          # Submit the next batch's decoding before waiting for this one.
          upcoming = submit(step + 1)
          pixels = np.zeros((self.local_batch, size, size, 3), np.uint8)
          for row, future in enumerate(pending):
            pixels[row] = future.result()
          yield {"image": pixels, "row": self._rows(step, count)}
          pending = upcoming

    return self._run(self._encode_images, params, batches(), count, desc)
