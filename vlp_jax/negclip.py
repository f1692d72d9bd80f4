"""NegCLIP hard negatives: swapped-word captions, nearest-neighbour images, and the loss.

NegCLIP (Yuksekgonul et al., "When and why vision-language models behave like
bags-of-words", ICLR 2023) fine-tunes a CLIP with, per training pair:
- a *swapped* negative caption: two words of the same part of speech (noun, adjective,
  verb, adverb), or two noun phrases, trade places ("a red circle left of a blue
  square" -> "a blue circle left of a red square"), so only word order tells them apart;
- a *hard image*: the nearest neighbour of the image in the model's own image-embedding
  space, with its caption and that caption's swapped negative.

A global batch of B pairs becomes 2B images [images; hard images] and 4B texts
[captions; hard captions; negatives; hard negatives]; `negclip_loss` is image->text
cross-entropy over all 4B texts plus text->image cross-entropy over the first 2B texts.

Pieces, in the order a run uses them:
1. `mine_hard_images` embeds every training record through the evaluation `Embedder`
   and `nearest_neighbours` finds each one's top-1 cosine neighbour blockwise on the
   device; `save_neighbours` / `load_neighbours` keep the result in
   `<workdir>/negclip_neighbours.npy`.
2. `NegClipSpec(neighbours, tagger)` passed to `pipeline.create_train_dataset` adds the
   fields "hard_image", "hard_tokens", "neg_tokens", "hard_neg_tokens" to every row.
3. The train step stacks them (IMAGE_FIELDS, TOKEN_FIELDS, in order; trainer.BatchFields)
   into the model's 2B images and 4B token rows, and `negclip_loss` scores them.

Part-of-speech tags come from a `Tagger`: spaCy's when a spaCy model is installed
(`pip install spacy && python -m spacy download en_core_web_sm`), otherwise a lexicon,
by default the built-in dataset's (`builtin_lexicon`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from PIL import Image

from vlp_jax.input_pipeline import builtin, pipeline, records

if TYPE_CHECKING:
  from vlp_jax.evaluation.embedding import ImageSource

# ---------------------------------------------------------------- part-of-speech tagging

NOUN, ADJ, VERB, ADV, OTHER = "NOUN", "ADJ", "VERB", "ADV", "OTHER"
SWAPPABLE_POS = (NOUN, ADJ, VERB, ADV)
NOUN_PHRASE = "NP"  # The swap category of two noun phrases.
# Universal POS tags (https://universaldependencies.org/u/pos/) -> the coarse classes above.
_COARSE_POS = {"NOUN": NOUN, "PROPN": NOUN, "ADJ": ADJ, "VERB": VERB, "ADV": ADV}
DEFAULT_SPACY_MODEL = "en_core_web_sm"
TAGGER_KINDS = ("auto", "lexicon", "spacy", "spacy:<model>")

# A word: letters/digits, possibly joined by apostrophes or hyphens ("don't", "t-shirt").
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_WORD_CHAR = re.compile(r"\w")
_WORDISH_CHAR = re.compile(r"[\w'’-]")


def coarse_pos(tag: str) -> str:
  """A Universal POS tag (any case) -> NOUN, ADJ, VERB, ADV or OTHER."""
  return _COARSE_POS.get(tag.upper(), OTHER)


def words(text: str) -> list[str]:
  """The words of `text` (punctuation and spacing dropped), in order."""
  return _WORD.findall(text)


class Token(NamedTuple):
  """A tagged word: its text, coarse POS, and character span [start, end) in the caption."""

  text: str
  pos: str
  start: int
  end: int


@dataclasses.dataclass(frozen=True)
class Tagging:
  """A caption's tagged tokens and its noun phrases as character spans [start, end)."""

  tokens: tuple[Token, ...]
  noun_phrases: tuple[tuple[int, int], ...] = ()

  def pairs(self) -> list[tuple[str, str]]:
    """[(word, coarse POS), ...]."""
    return [(t.text, t.pos) for t in self.tokens]


class Tagger(Protocol):
  """caption -> its tagged tokens (coarse POS) and noun-phrase spans. Must be picklable:
  the training pipeline's worker processes receive a copy."""

  def tag(self, caption: str) -> Tagging: ...


class TaggerUnavailableError(ImportError):
  """The tagger asked for needs a package or model that is not installed."""


_NOMINAL = ("NOUN", "PROPN")
_IN_NOUN_PHRASE = ("DET", "NUM", "ADJ", *_NOMINAL)


class LexiconTagger:
  """Tags words by looking them up (lower-cased) in a word -> Universal POS tag lexicon.

  Unknown words are OTHER, so they are never swapped. Noun phrases are chunked from the
  tags: maximal runs of DET / NUM / ADJ / NOUN / PROPN words separated by spaces only,
  split after a noun that is followed by a non-noun, trimmed to end on a noun.
  """

  def __init__(self, lexicon: Mapping[str, str]):
    self.lexicon = {str(w).lower(): str(t).upper() for w, t in lexicon.items()}

  def tag(self, caption: str) -> Tagging:
    found = [
      (m.group(), self.lexicon.get(m.group().lower(), "X"), m.start(), m.end())
      for m in _WORD.finditer(caption)
    ]
    tokens = tuple(Token(text, coarse_pos(tag), start, end) for text, tag, start, end in found)
    phrases: list[tuple[int, int]] = []
    run: list[tuple[str, int, int]] = []  # (tag, start, end) of the current chunk

    def flush() -> None:
      while run and run[-1][0] not in _NOMINAL:
        run.pop()
      if run:
        phrases.append((run[0][1], run[-1][2]))
      run.clear()

    for _, tag, start, end in found:
      if tag not in _IN_NOUN_PHRASE:
        flush()
        continue
      if run and (
        caption[run[-1][2] : start].strip() or (run[-1][0] in _NOMINAL and tag not in _NOMINAL)
      ):
        flush()
      run.append((tag, start, end))
    flush()
    return Tagging(tokens, tuple(phrases))


def builtin_lexicon() -> dict[str, str]:
  """Word -> Universal POS tag for every word of the built-in dataset's captions.

  Built from `builtin`'s own vocabulary: shapes are nouns, sizes and colours adjectives;
  in "left of" / "right of" the direction is an adverb and "of" an adposition, and the
  one-word relations ("above", "below") are adpositions (not swapped). The few words of
  the caption template itself ("a ... , which is ...") are listed here.
  """
  lexicon = {"a": "DET", "which": "PRON", "is": "AUX"}
  lexicon.update({shape: "NOUN" for shape in builtin.SHAPES})
  lexicon.update({size: "ADJ" for size in builtin.SIZES})
  lexicon.update({colour: "ADJ" for colour in builtin.COLOUR_NAMES})
  for relation in builtin.RELATIONS:
    head, *rest = relation.split()
    lexicon[head] = "ADV" if rest else "ADP"
    lexicon.update({w: "ADP" for w in rest})
  return lexicon


class SpacyTagger:
  """spaCy's coarse POS tags (PROPN counts as NOUN) and noun chunks.

  spaCy is optional and imported only here; a missing package or model raises
  `TaggerUnavailableError` saying how to install it. Pickles without the pipeline, which
  each worker process loads again on first use. `nlp` substitutes a loaded pipeline.
  """

  def __init__(self, model_name: str = DEFAULT_SPACY_MODEL, nlp: Any = None):
    self.model_name = model_name
    self._owns_nlp = nlp is None
    self._nlp = _load_spacy(model_name) if nlp is None else nlp

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    if self._owns_nlp:
      state["_nlp"] = None
    return state

  def tag(self, caption: str) -> Tagging:
    if self._nlp is None:
      self._nlp = _load_spacy(self.model_name)
    doc = self._nlp(caption)
    tokens = tuple(
      Token(t.text, coarse_pos(t.pos_), t.idx, t.idx + len(t.text)) for t in doc if not t.is_space
    )
    try:
      phrases = tuple((chunk.start_char, chunk.end_char) for chunk in doc.noun_chunks)
    except (ValueError, NotImplementedError):  # A pipeline without a dependency parser.
      phrases = ()
    return Tagging(tokens, phrases)


def _load_spacy(model_name: str) -> Any:
  try:
    import spacy
  except ImportError as e:
    raise TaggerUnavailableError(
      f"the spaCy tagger needs spaCy and a model; install them with: pip install spacy && "
      f"python -m spacy download {model_name}"
    ) from e
  try:
    nlp = spacy.load(model_name)
  except OSError as e:
    raise TaggerUnavailableError(
      f"spaCy model {model_name!r} is not installed: python -m spacy download {model_name}"
    ) from e
  for name in ("ner", "lemmatizer"):  # Not needed for tags and noun chunks.
    if name in nlp.pipe_names:
      nlp.disable_pipe(name)
  return nlp


def create_tagger(kind: str = "auto") -> Tagger:
  """ "lexicon" (the built-in dataset's), "spacy" (en_core_web_sm), "spacy:<model>", or
  "auto": spaCy's en_core_web_sm when installed, else the built-in lexicon (with a
  warning: it knows only the built-in dataset's words)."""
  if kind == "lexicon":
    return LexiconTagger(builtin_lexicon())
  if kind == "spacy" or kind.startswith("spacy:"):
    return SpacyTagger(kind.partition(":")[2] or DEFAULT_SPACY_MODEL)
  if kind == "auto":
    try:
      return SpacyTagger(DEFAULT_SPACY_MODEL)
    except TaggerUnavailableError as e:
      logging.warning(
        "NegCLIP negatives: %s. Using the built-in dataset's lexicon, which tags only that "
        "dataset's words (other captions get any-two-word swaps).",
        e,
      )
      return LexiconTagger(builtin_lexicon())
  raise ValueError(f"unknown tagger {kind!r}; expected one of {TAGGER_KINDS}")


# ---------------------------------------------------------------- swapped negatives

Span = tuple[int, int]


def _is_whole(text: str, start: int, end: int) -> bool:
  """Whether [start, end) begins and ends on a word character and is cut off from its
  neighbours (no letter, digit, apostrophe or hyphen just outside it): moving it then
  moves whole words and leaves the caption's other words intact."""
  if not 0 <= start < end <= len(text):
    return False
  if not (_WORD_CHAR.match(text[start]) and _WORD_CHAR.match(text[end - 1])):
    return False
  before = start == 0 or not _WORDISH_CHAR.match(text[start - 1])
  after = end == len(text) or not _WORDISH_CHAR.match(text[end])
  return before and after


def _swap(text: str, a: Span, b: Span) -> str:
  (s1, e1), (s2, e2) = sorted((a, b))
  return text[:s1] + text[s2:e2] + text[e1:s2] + text[s1:e1] + text[e2:]


def _distinct_pairs(text: str, spans: Sequence[Span]) -> list[tuple[Span, Span]]:
  """Pairs of non-overlapping spans whose texts differ (ignoring case)."""
  return [
    (a, b)
    for i, a in enumerate(spans)
    for b in spans[i + 1 :]
    if (a[1] <= b[0] or b[1] <= a[0]) and text[a[0] : a[1]].lower() != text[b[0] : b[1]].lower()
  ]


def swap_candidates(caption: str, tagging: Tagging) -> dict[str, list[tuple[Span, Span]]]:
  """Category (NOUN, ADJ, VERB, ADV, NP) -> the pairs of spans that may trade places."""
  candidates = {}
  for pos in SWAPPABLE_POS:
    spans = [
      (t.start, t.end)
      for t in tagging.tokens
      if t.pos == pos and _is_whole(caption, t.start, t.end)
    ]
    candidates[pos] = _distinct_pairs(caption, spans)
  phrases = [(s, e) for s, e in tagging.noun_phrases if _is_whole(caption, s, e)]
  candidates[NOUN_PHRASE] = _distinct_pairs(caption, sorted(set(phrases)))
  return {k: v for k, v in candidates.items() if v}


def _random_swap(
  caption: str, candidates: dict[str, list[tuple[Span, Span]]], rng: np.random.Generator
) -> str | None:
  """A category uniformly among those with candidates, then a pair uniformly within it."""
  candidates = {k: list(v) for k, v in candidates.items()}
  while candidates:
    category = sorted(candidates)[int(rng.integers(len(candidates)))]
    pairs = candidates[category]
    a, b = pairs.pop(int(rng.integers(len(pairs))))
    result = _swap(caption, a, b)
    if result != caption:  # Spans of different lengths can rebuild the same string.
      return result
    if not pairs:
      del candidates[category]
  return None


def swap_negative(caption: str, tagger: Tagger, rng: np.random.Generator) -> str | None:
  """`caption` with two words of one part of speech (noun, adjective, verb, adverb), or
  two noun phrases, swapped; None when no such swap changes it.

  The swapped words differ (ignoring case). Everything else stays in place, characters
  between and around the swapped words included, so the result has exactly the words
  of `caption` (as `words` splits them) in another order. A word glued to a letter,
  apostrophe or hyphen outside its span (a tagger's sub-word token, as spaCy's "n't")
  is never moved. The category is drawn uniformly among those with a possible swap,
  then the pair uniformly within it.
  """
  return _random_swap(caption, swap_candidates(caption, tagger.tag(caption)), rng)


def any_word_swap(caption: str, rng: np.random.Generator) -> str | None:
  """`caption` with two of its words (any part of speech, different texts) swapped; None
  when it has fewer than two different words."""
  spans = [m.span() for m in _WORD.finditer(caption)]
  pairs = _distinct_pairs(caption, spans)
  return _random_swap(caption, {"any": pairs}, rng) if pairs else None


# How a row's negative was made (the pipeline's "negative_kind" field).
NEGATIVE_SWAP = 0  # swap_negative: same part of speech or noun phrases.
NEGATIVE_ANY_SWAP = 1  # any_word_swap: no same-POS swap existed.
NEGATIVE_OTHER_CAPTION = 2  # Fewer than two different words: the row's other caption.


def make_negative(
  caption: str, other_caption: str, tagger: Tagger, rng: np.random.Generator
) -> tuple[str, int]:
  """(negative, kind) for `caption`: a same-POS swap when there is one, else a swap of any
  two different words, else (fewer than two different words) `other_caption`, the other
  caption of the row (the hard caption for a caption, the caption for a hard caption),
  which is already a negative of that image: the batch then holds it twice, but never
  turns a positive into a negative."""
  negative = swap_negative(caption, tagger, rng)
  if negative is not None:
    return negative, NEGATIVE_SWAP
  negative = any_word_swap(caption, rng)
  if negative is not None:
    return negative, NEGATIVE_ANY_SWAP
  return other_caption, NEGATIVE_OTHER_CAPTION


# ---------------------------------------------------------------- the loss


def negclip_loss(
  image: jax.Array, text: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NegCLIP's loss on L2-normalised embeddings (a `losses.LossFn`; bias unused).

  image: (2B, D) = [images; hard images]; text: (4B, D) = [captions; hard captions;
  negatives; hard negatives], so image j's caption is text j and its swapped negative
  text 2B + j. Image->text cross-entropy runs over all 4B texts, text->image over the
  first 2B texts only (a negative caption has no image); the loss is their mean.
  Metrics: "train_i2t_accuracy" (top-1 over the 4B texts) and "train_swap_accuracy"
  (the caption scores above its own swapped negative).
  """
  del logit_bias
  num_images = image.shape[0]
  if text.shape[0] != 2 * num_images:
    raise ValueError(
      f"NegCLIP needs twice as many texts as images; got {text.shape[0]} texts for "
      f"{num_images} images"
    )
  logits = logit_scale * image @ text.T  # (2B, 4B)
  labels = jnp.arange(num_images)
  ce = optax.softmax_cross_entropy_with_integer_labels
  image_to_text = ce(logits, labels).mean()
  text_to_image = ce(logits[:, :num_images].T, labels).mean()
  loss = (image_to_text + text_to_image) / 2
  positive = logits[labels, labels]
  swapped = logits[labels, labels + num_images]
  return loss, {
    "loss": loss,
    "train_i2t_accuracy": (jnp.argmax(logits, axis=1) == labels).mean(),
    "train_swap_accuracy": (positive > swapped).mean(),
  }


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
    from vlp_jax.evaluation.embedding import DataError, RecordImage

    try:
      return RecordImage(self.source, self.index).open()
    except DataError as e:
      logging.warning("NegCLIP mining: record %d unreadable, embedded as grey: %s", self.index, e)
      return Image.new("RGB", (1, 1), (128, 128, 128))


EmbedImages = Callable[[Iterable["ImageSource"], int], np.ndarray]


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
  """What `pipeline.create_train_dataset(..., negclip=spec)` needs to add hard negatives.

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

  def text_fields(self) -> tuple[tuple[str, str], ...]:
    """(text field, token field) pairs for `pipeline.TokenizeBatch`."""
    texts = ("text", "hard_text", "neg_text", "hard_neg_text")
    return tuple(zip(texts, TOKEN_FIELDS))

  def train_transform(
    self, base: pipeline.TrainTransform, shards: Sequence[str]
  ) -> NegClipTransform:
    """`base` (the plain training transform) extended with this spec's hard negatives."""
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
