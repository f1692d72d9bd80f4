"""NegCLIP (Yuksekgonul et al., ICLR 2023): contrastive fine-tuning with hard negatives.

Per training pair: a swapped-word negative caption (`input_pipeline.negatives`) and a
*hard image*, the nearest neighbour of the image in the starting model's own embedding
space, with its caption and that caption's negative. A global batch of B pairs becomes
2B images [images; hard images] and 4B texts [captions; hard captions; negatives; hard
negatives]; `losses.negclip_loss` scores them.

In the order a run uses them:
1. `NegClip.pipeline_extension` (before data starts): `mine_hard_images` embeds every
   training record through the evaluation embedder and `nearest_neighbours` finds each
   one's top-1 cosine neighbour blockwise on the device; kept in
   `<workdir>/negclip_neighbours.npy` and reused on resume.
2. `NegClipSpec(neighbours, tagger)`, the pipeline's row extension, adds "hard_image",
   "hard_tokens", "neg_tokens", "hard_neg_tokens" to every row.
3. The contrastive step stacks them (IMAGE_FIELDS, TOKEN_FIELDS, in order).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from vlp_jax import losses
from vlp_jax.config_lib import ConfigBlock, at_least
from vlp_jax.input_pipeline import pipeline, records
from vlp_jax.input_pipeline.image_sources import DataError, ImageSource, RecordImage
from vlp_jax.input_pipeline.negatives import (
  NEGATIVE_ANY_SWAP,
  NEGATIVE_OTHER_CAPTION,
  NEGATIVE_SWAP,
  Tagger,
  create_tagger,
  make_negative,
)
from vlp_jax.methods import contrastive
from vlp_jax.methods.base import DataContext, MethodContext

IMAGE_FIELDS = ("image", "hard_image")
TOKEN_FIELDS = ("tokens", "hard_tokens", "neg_tokens", "hard_neg_tokens")


# ---------------------------------------------------------------- hard images


@functools.partial(jax.jit, static_argnames=("num_blocks", "size"))
def _normalised_blocks(embeddings: jax.Array, num_blocks: int, size: int) -> jax.Array:
  """(N, D) -> unit rows padded with zero rows to (num_blocks, size, D)."""
  x = embeddings.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  x = jnp.pad(x, ((0, num_blocks * size - x.shape[0]), (0, 0)))
  return x.reshape(num_blocks, size, x.shape[1])


@jax.jit
def _block_neighbours(blocks: jax.Array, query_block: jax.Array, count: jax.Array) -> jax.Array:
  """Top-1 neighbour (not itself, not padding) of each row of one block among all rows."""
  size = blocks.shape[1]
  queries = blocks[query_block]
  query_ids = query_block * size + jnp.arange(size)

  def visit(best, key_block):
    best_sim, best_id = best
    key_ids = key_block * size + jnp.arange(size)
    sims = queries @ blocks[key_block].T
    allowed = (key_ids[None, :] < count) & (key_ids[None, :] != query_ids[:, None])
    sims = jnp.where(allowed, sims, -jnp.inf)
    block_sim = sims.max(axis=1)
    block_id = key_block * size + jnp.argmax(sims, axis=1)
    better = block_sim > best_sim  # Strictly: ties keep the earlier (smaller) index.
    return (jnp.where(better, block_sim, best_sim), jnp.where(better, block_id, best_id)), None

  init = (jnp.full((size,), -jnp.inf), jnp.zeros((size,), jnp.int32))
  (_, best_id), _ = jax.lax.scan(visit, init, jnp.arange(blocks.shape[0]))
  return best_id


def nearest_neighbours(embeddings: np.ndarray, block_size: int = 4096) -> np.ndarray:
  """Each row's most cosine-similar other row: (N,) int64, ties to the smaller index.

  Rows are compared block by block on the default device (one jitted program for all
  blocks: the last is padded), so memory holds the N x D embeddings plus one block x
  block similarity matrix: N = 1e6 at D = 512 needs ~2 GB and 64 MB for blocks of 4096.
  Zero rows are similar to nothing (similarity 0). The matmul runs at the device's
  default float32 precision (TF32 on recent GPUs: near-ties may resolve differently).
  """
  embeddings = np.asarray(embeddings)
  if embeddings.ndim != 2 or len(embeddings) < 2:
    raise ValueError(f"need (N >= 2, D) embeddings, got shape {embeddings.shape}")
  count = len(embeddings)
  size = min(block_size, -(-count // 8) * 8)
  num_blocks = -(-count // size)
  blocks = _normalised_blocks(jnp.asarray(embeddings, jnp.float32), num_blocks, size)
  count_arg = jnp.int32(count)
  # Dispatch is asynchronous: every block is queued before the first result is read.
  found = [_block_neighbours(blocks, jnp.int32(q), count_arg) for q in range(num_blocks)]
  return np.concatenate([np.asarray(f) for f in found])[:count].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _RecordToEmbed:
  """Record `index`'s image for the Embedder; a corrupt record reads as a grey pixel (the
  trainer skips that record anyway, and a row whose hard image it is)."""

  source: Any  # grain.sources.ArrayRecordDataSource
  index: int

  def open(self) -> Image.Image:
    try:
      return RecordImage(self.source, self.index).open()
    except DataError as e:
      logging.warning("NegCLIP mining: record %d unreadable, embedded as grey: %s", self.index, e)
      return Image.new("RGB", (1, 1), (128, 128, 128))


EmbedImages = Callable[[Iterable[ImageSource], int], np.ndarray]


def mine_hard_images(
  embed_images: EmbedImages, shards: Sequence[str], *, block_size: int = 4096
) -> np.ndarray:
  """The hard image of every training record: its nearest neighbour by image embedding.

  `embed_images(images, count)` embeds `count` image sources in order, as
  `functools.partial(embedder.images, params)` does with an `evaluation.Embedder`
  (center crop at the model's image size, static batches on the mesh, on every host);
  pass the parameters of the model about to be fine-tuned. Returns (N,) int64: entry i
  is the index of record i's neighbour among the N records of `shards` concatenated in
  order (the pipeline's record indices). Corrupt records embed as a grey image.
  """
  source = grain.sources.ArrayRecordDataSource(list(shards))
  count = len(source)
  if count < 2:
    raise ValueError(f"NegCLIP mining needs at least 2 training records, found {count}")
  images = (_RecordToEmbed(source, i) for i in range(count))
  embeddings = np.asarray(embed_images(images, count))
  if embeddings.shape[0] != count:
    raise ValueError(f"embed_images returned {embeddings.shape[0]} embeddings for {count} images")
  logging.info("NegCLIP: finding the nearest neighbours of %d image embeddings", count)
  return nearest_neighbours(embeddings, block_size)


NEIGHBOURS_FILE = "negclip_neighbours.npy"


def neighbours_path(workdir: str) -> str:
  return os.path.join(workdir, NEIGHBOURS_FILE)


def save_neighbours(workdir: str, neighbours: np.ndarray) -> str:
  """Writes `<workdir>/negclip_neighbours.npy` atomically (a temporary file, then
  os.replace: readers never see half a file; concurrent writers leave one whole copy)."""
  path = neighbours_path(workdir)
  os.makedirs(workdir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{NEIGHBOURS_FILE}.", dir=workdir)
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.asarray(neighbours, np.int64))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def check_neighbours(neighbours: np.ndarray, num_records: int, name: str = "neighbours") -> None:
  """Raises ValueError unless `neighbours` is (num_records,) integers in [0, num_records)."""
  neighbours = np.asarray(neighbours)
  if neighbours.shape != (num_records,) or not np.issubdtype(neighbours.dtype, np.integer):
    raise ValueError(
      f"{name} has shape {neighbours.shape} and dtype {neighbours.dtype}; expected "
      f"({num_records},) integers, one per training record"
    )
  if num_records and (neighbours.min() < 0 or neighbours.max() >= num_records):
    raise ValueError(f"{name} holds record indices outside [0, {num_records})")


def load_neighbours(workdir: str, num_records: int | None = None) -> np.ndarray | None:
  """`<workdir>/negclip_neighbours.npy`, or None when there is none. With `num_records`,
  a file made for other data raises ValueError (delete it to mine again)."""
  path = neighbours_path(workdir)
  if not os.path.exists(path):
    return None
  neighbours = np.load(path, allow_pickle=False)
  if num_records is not None:
    try:
      check_neighbours(neighbours, num_records, path)
    except ValueError as e:
      raise ValueError(f"{e}: was it mined for other data? Delete it to mine again") from e
  return neighbours.astype(np.int64)


def load_or_mine_hard_images(
  workdir: str, embed_images: EmbedImages, shards: Sequence[str], *, block_size: int = 4096
) -> np.ndarray:
  """The saved neighbours of `workdir` if any, else `mine_hard_images` and save them."""
  num_records = len(grain.sources.ArrayRecordDataSource(list(shards)))
  neighbours = load_neighbours(workdir, num_records)
  if neighbours is None:
    neighbours = mine_hard_images(embed_images, shards, block_size=block_size)
    save_neighbours(workdir, neighbours)
  return neighbours


# ---------------------------------------------------------------- the training pipeline


@dataclasses.dataclass(eq=False)
class NegClipSpec:
  """The row extension (`pipeline.RowExtension`) that adds NegCLIP's hard negatives.

  neighbours: (N,) ints, the hard image of record i is record neighbours[i], indices
    counted over the concatenation of the training shards in order (one shard set: a
    weighted mixture is refused).
  tagger: tags captions for `swap_negative` (see `create_tagger`).

  Random choices (the hard image's augmentation and caption, the swaps) draw from the
  pipeline's per-row generator, seeded by the pipeline seed and the row's global
  position: batches are deterministic and resume exactly. Each row gains:
    "hard_image" uint8 (S, S, 3): record neighbours[i], augmented like "image";
    "hard_tokens": one of its captions; "neg_tokens" / "hard_neg_tokens": `make_negative`
    of the caption / hard caption (int32, like "tokens"); "hard_index" int64: the
    neighbour's record index; "negative_kind" int32 (2,): how the two negatives were
    made (NEGATIVE_SWAP, NEGATIVE_ANY_SWAP, NEGATIVE_OTHER_CAPTION).
  A row whose hard image's record is corrupt is skipped like a corrupt record.
  """

  neighbours: np.ndarray
  tagger: Tagger
  word_ids = False

  def text_fields(self) -> tuple[tuple[str, str], ...]:
    """(text field, token field) pairs for `pipeline.TokenizeBatch`."""
    texts = ("text", "hard_text", "neg_text", "hard_neg_text")
    return tuple(zip(texts, TOKEN_FIELDS))

  def train_transform(
    self, base: pipeline.TrainTransform, shard_sets: Sequence[records.ShardSet]
  ) -> NegClipTransform:
    """`base` (the plain training transform) extended with this spec's hard negatives."""
    if len(shard_sets) != 1:
      raise ValueError(
        f"NegCLIP hard negatives need a single training shard set, not a mixture of "
        f"{len(shard_sets)}: its neighbour indices are record indices within that set"
      )
    shards = shard_sets[0].shards
    num_records = len(grain.sources.ArrayRecordDataSource(list(shards)))
    check_neighbours(self.neighbours, num_records, "NegCLIP neighbours")
    return NegClipTransform(base, tuple(shards), np.asarray(self.neighbours, np.int64), self.tagger)


@dataclasses.dataclass
class NegClipTransform(grain.transforms.RandomMap):
  """`TrainTransform`'s example plus its hard image, hard caption and two negatives.

  The plain example is drawn first from the row's generator, so "image" and "text" are
  exactly those of the pipeline without NegCLIP.
  """

  base: pipeline.TrainTransform
  shards: tuple[str, ...]
  neighbours: np.ndarray
  tagger: Tagger
  _source: Any = dataclasses.field(default=None, init=False, repr=False)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_source": None}  # Each worker opens the shards itself.

  def _records(self) -> Any:
    if self._source is None:  # Two threads may both open it: harmless.
      self._source = grain.sources.ArrayRecordDataSource(list(self.shards))
    return self._source

  def random_map(self, element: tuple[int, int, bytes], rng: np.random.Generator) -> dict | None:
    example = self.base.random_map(element, rng)
    if example is None:
      return None
    hard_index = int(self.neighbours[int(example["index"])])
    try:
      hard_image, hard_text = self.base.augment(self._records()[hard_index], rng)
    except (records.RecordError, pipeline.ImageError) as e:
      logging.log_every_n_seconds(
        logging.WARNING,
        "Skipping record %d: its hard image, record %d: %s",
        10,
        example["index"],
        hard_index,
        e,
      )
      return None
    text = example["text"]
    neg_text, neg_kind = make_negative(text, hard_text, self.tagger, rng)
    hard_neg_text, hard_neg_kind = make_negative(hard_text, text, self.tagger, rng)
    example.update(
      hard_image=hard_image,
      hard_text=hard_text,
      neg_text=neg_text,
      hard_neg_text=hard_neg_text,
      hard_index=np.int64(hard_index),
      negative_kind=np.array([neg_kind, hard_neg_kind], np.int32),
    )
    return example


def negative_kind_counts(kinds: np.ndarray) -> dict[str, int]:
  """Counts of a batch's "negative_kind" values, for logging."""
  kinds = np.asarray(kinds).ravel()
  names = {"swap": NEGATIVE_SWAP, "any_swap": NEGATIVE_ANY_SWAP, "other": NEGATIVE_OTHER_CAPTION}
  return {name: int((kinds == value).sum()) for name, value in names.items()}


# ---------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class NegClip(contrastive.Contrastive):
  tagger: Tagger | None = None
  block_size: int = 4096  # config.negclip.block_size
  name = "negclip"

  def pipeline_extension(self, ctx: DataContext) -> NegClipSpec:
    """Mines the hard images with the starting parameters (once per workdir)."""
    neighbours = load_or_mine_hard_images(
      ctx.workdir,
      ctx.embed_images,
      list(ctx.train_sets[0].shards),
      block_size=self.block_size,
    )
    return NegClipSpec(neighbours, self.tagger)


def create(ctx: MethodContext) -> NegClip:
  """config.method "negclip": the contrastive method with NegCLIP's batch and loss."""
  config = ctx.config
  if len(ctx.train_sets) > 1:
    raise ValueError("config.data.train: NegCLIP mines hard images in one shard set, not a mix")
  if config.loss.kind != "clip" or config.loss.form != "auto":
    raise ValueError(
      f"config.loss.kind={config.loss.kind!r}, form={config.loss.form!r}: NegCLIP has its "
      "own loss; leave config.loss at kind 'clip', form 'auto'"
    )
  try:
    tagger = create_tagger(config.negclip.tagger)
  except (ValueError, ImportError) as e:
    raise ValueError(f"config.negclip.tagger: {e}") from e
  return contrastive.create(
    ctx,
    cls=NegClip,
    loss_fn=losses.negclip_loss,
    image_fields=IMAGE_FIELDS,
    text_fields=TOKEN_FIELDS,
    tagger=tagger,
    block_size=config.negclip.block_size,
  )


# ---------------------------------------------------------------- config.negclip


def _config_defaults() -> ml_collections.ConfigDict:
  """config.negclip: hard images are every record's nearest neighbour by the starting
  model's image embedding (mined once per run into the workdir), negatives swap two
  same-part-of-speech words or noun phrases."""
  block = ml_collections.ConfigDict()
  # Tagger: "auto" (spaCy's en_core_web_sm if installed, else the lexicon), "lexicon" (the
  # built-in dataset's words), "spacy" or "spacy:<model>" (pip install spacy && python -m
  # spacy download en_core_web_sm).
  block.tagger = "auto"
  block.block_size = 4096  # Embeddings compared per block when mining.
  return block


# The block a run of this method carries (vlp_jax.configs.common.base_config(method)) and
# the valid range of its numeric fields, checked before any compute.
CONFIG_BLOCK = ConfigBlock(
  "negclip",
  _config_defaults,
  {
    "block_size": at_least(1),
  },
)
