"""Text tokenisers, selected by `config.data.tokenizer`.

- "wordpiece": BERT's WordPiece (vocab file, one token per line) on tensorflow-text; ids
  equal Hugging Face's BertTokenizerFast for the same vocab and lower-casing.
- "sentencepiece": a SentencePiece `.model` file on tensorflow-text; ids equal the
  `sentencepiece` package's own encoding.
- "clip_bpe": CLIP's byte-level BPE from its merges file (`bpe_simple_vocab_16e6.txt.gz`,
  shipped in assets/: `default_vocab_file`); ids equal open_clip's default tokenizer.

A run on its own shards without a vocab file gets a WordPiece vocab learned once from its
training captions and kept in the workdir (`ensure_learned_vocab`).

Every tokeniser returns fixed-length int32 rows: [start] pieces... end [pad]...; over-long
texts are truncated before the end token, which always survives because the text tower
pools it. Alongside the ids, `encode_with_word_ids` gives each token the index of the word
it came from (for whole-word masking). A "word" is one unit of the tokeniser's own
pre-tokeniser: BERT's whitespace/punctuation/CJK split, SentencePiece's whitespace split,
CLIP's letter-run/digit/punctuation-run split.

Tokenisers are picklable: the TensorFlow objects and caches are built lazily in whichever
process (trainer or grain worker) first calls them.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import regex
from absl import logging

from vlp_jax.input_pipeline import clip_bpe, records
from vlp_jax.input_pipeline.sentencepiece_model import WORD_START, read_sentencepiece_model

TOKENIZER_KINDS = ("wordpiece", "sentencepiece", "clip_bpe")
RESERVED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NO_WORD = -1  # Word id of special tokens and padding.


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipeline, evaluators and model need from a tokeniser."""

  context_length: int
  pad_id: int

  @property
  def vocab_size(self) -> int: ...

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """(len(texts), context_length) int32 ids."""
    ...

  def encode_with_word_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids and, per token, the index of its word within its text (-1: special or pad)."""
    ...


def import_tensorflow():
  """Imports TensorFlow for host-side text ops only: no GPU memory grab, one thread."""
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:
    pass  # Already initialised in this process; the settings above were applied then.
  return tf


class _FixedLengthTokenizer:
  """Lays out sub-class encodings as fixed-length rows: [start] ids... end pad..."""

  context_length: int
  pad_id: int
  start_id: int | None
  end_id: int

  def _encode(self, texts: Sequence[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Ids without special tokens and their word indices; may stop after `max_tokens`."""
    raise NotImplementedError

  def encode_with_word_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(len(texts), context_length) int32 ids and, per token, its word's index within its
    text; -1 for special tokens and padding."""
    first = 0 if self.start_id is None else 1  # Position of the first text token.
    room = self.context_length - first - 1
    ids = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    word_ids = np.full((len(texts), self.context_length), NO_WORD, np.int32)
    for row, (pieces, words) in enumerate(self._encode(texts, room)):
      pieces, words = pieces[:room], words[:room]
      if first:
        ids[row, 0] = self.start_id
      ids[row, first : first + len(pieces)] = pieces
      word_ids[row, first : first + len(words)] = words
      ids[row, first + len(pieces)] = self.end_id
    return ids, word_ids

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Tokenises a list of texts into (len(texts), context_length) int32 ids."""
    return self.encode_with_word_ids(texts)[0]


def _check_context_length(context_length: int, specials: int) -> None:
  if context_length <= specials:
    raise ValueError(f"context_length {context_length} leaves no room for text")


# ----------------------------------------------------------------------------- WordPiece


def read_vocab(path: str) -> list[str]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"vocab file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    vocab = [line.rstrip("\n") for line in f]
  if not vocab:
    raise ValueError(f"vocab file {path!r} is empty")
  return vocab


def save_vocab(path: str, vocab: Sequence[str]) -> None:
  """Writes a WordPiece vocab, one token per line; it appears only once complete."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  os.replace(tmp, path)


def learn_wordpiece_vocab(
  texts: Iterable[str], vocab_size: int, lower_case: bool = True
) -> list[str]:
  """Learns a WordPiece vocabulary with tensorflow-text's BERT vocabulary builder."""
  tf = import_tensorflow()
  from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as builder

  dataset = tf.data.Dataset.from_tensor_slices(list(texts)).batch(1024)
  return builder.bert_vocab_from_dataset(
    dataset,
    vocab_size=vocab_size,
    reserved_tokens=list(RESERVED_TOKENS),
    bert_tokenizer_params={"lower_case": lower_case},
  )


# BERT's pre-tokeniser, as in the original BERT and Hugging Face's BertNormalizer and
# BertPreTokenizer (tensorflow-text's own normaliser case-folds with NFKC instead, which
# gives other ids for e.g. "ß", "ﬁ", full-width letters and "…"):
# - drop control/format/unassigned characters (Unicode category C except \t \n \r) and U+FFFD;
# - split on white space; every punctuation character (Unicode P or ASCII non-alphanumeric
#   symbol) and every CJK ideograph is a word of its own.
_BERT_DROPPED = regex.compile(r"[^\P{C}\t\n\r]|\ufffd")
_BERT_SINGLES = (
  r"\p{P}!-/:-@\[-`{-~"
  r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ceaf"
  r"\U0002f800-\U0002fa1f"
)
_BERT_WORDS = regex.compile("[" + _BERT_SINGLES + r"]|[^\s" + _BERT_SINGLES + "]+")
_NONSPACING_MARKS = regex.compile(r"\p{Mn}")
# WordPiece gives [UNK] for words of more characters than this (BERT's limit).
MAX_WORD_CHARS = 100


def bert_words(text: str, lower_case: bool) -> list[str]:
  """BERT's basic tokenisation: clean, (strip accents, lower-case), split into words."""
  text = _BERT_DROPPED.sub("", text)
  if lower_case and not text.isascii():
    text = _NONSPACING_MARKS.sub("", unicodedata.normalize("NFD", text))
    # Capital sigma lower-cases to σ everywhere in BERT, not to word-final ς as in str.lower.
    text = text.replace("Σ", "σ")
  if lower_case:
    text = text.lower()
  return _BERT_WORDS.findall(text)


class WordPieceTokenizer(_FixedLengthTokenizer):
  """Text -> fixed-length int32 ids: [CLS] pieces... [SEP] [PAD]...

  Words are split by `bert_words` in Python; tensorflow-text's FastWordpieceTokenizer
  splits each new word into pieces once, and the result is cached per word (the cache is
  emptied when it grows past `max_cache_words`).
  """

  def __init__(
    self,
    vocab: Sequence[str],
    context_length: int,
    lower_case: bool = True,
    max_cache_words: int = 200_000,
  ):
    missing = [t for t in RESERVED_TOKENS[:4] if t not in vocab]
    if missing:
      raise ValueError(f"WordPiece vocab lacks the special tokens {missing}")
    if vocab[0] != "[PAD]":
      raise ValueError("WordPiece vocab must have [PAD] at id 0")
    _check_context_length(context_length, 2)
    self.vocab = list(vocab)
    self.context_length = context_length
    self.lower_case = lower_case
    self.max_cache_words = max_cache_words
    self.pad_id = 0
    self.unk_id = self.vocab.index("[UNK]")
    self.cls_id = self.start_id = self.vocab.index("[CLS]")
    self.sep_id = self.end_id = self.vocab.index("[SEP]")
    # MLM (ALBEF, CMask, VLC) needs [MASK]; CLIP-style training does not.
    self.mask_id = self.vocab.index("[MASK]") if "[MASK]" in self.vocab else None
    self._wordpiece = None
    self._cache: dict[str, list[int]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_wordpiece"] = None
    state["_cache"] = {}
    return state

  def _split_words(self, words: list[str]) -> list[list[int]]:
    if self._wordpiece is None:
      tf = import_tensorflow()
      import tensorflow_text as tf_text

      self._wordpiece = tf_text.FastWordpieceTokenizer(
        vocab=self.vocab,
        suffix_indicator="##",
        # Long words are handled before this; a character takes at most 4 bytes.
        max_bytes_per_word=4 * MAX_WORD_CHARS,
        token_out_type=tf.int32,
        unknown_token="[UNK]",
        no_pretokenization=True,
      )
    return self._wordpiece.tokenize(words).to_list()

  def _encode(self, texts: Sequence[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    # Replaced rather than cleared when full: a thread still reading the old one keeps it.
    if len(self._cache) > self.max_cache_words:
      self._cache = {}
    cache = self._cache
    # Words beyond max_tokens would be truncated anyway: each gives at least one piece.
    words_per_text = [bert_words(text, self.lower_case)[:max_tokens] for text in texts]
    new_words = set()
    for words in words_per_text:
      for word in words:
        if word not in cache:
          if len(word) > MAX_WORD_CHARS:
            cache[word] = [self.unk_id]
          else:
            new_words.add(word)
    if new_words:
      new_words = sorted(new_words)
      cache.update(zip(new_words, self._split_words(new_words)))
    encoded = []
    for words in words_per_text:
      ids, word_ids = [], []
      for index, word in enumerate(words):
        pieces = cache[word]
        ids += pieces
        word_ids += [index] * len(pieces)
      encoded.append((ids, word_ids))
    return encoded


# ------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(_FixedLengthTokenizer):
  """Text -> fixed-length int32 ids: pieces... EOS pad... (no BOS).

  The model must define EOS: it ends every text and the text tower pools it. Padding uses
  the model's pad piece; models without one (SentencePiece's default) pad with an extra
  id, `len(pieces)`, so padding is never confused with a real piece and `vocab_size` is
  one larger than the model's. Text normalisation is the model's own (`lower_case` does
  not apply). Word ids assume SentencePiece's default word-initial "▁".
  """

  def __init__(self, model_file: str, context_length: int):
    if not os.path.isfile(model_file):
      raise FileNotFoundError(f"SentencePiece model {model_file!r} does not exist")
    with open(model_file, "rb") as f:
      self.model = f.read()
    try:
      pieces, eos_id, pad_id = read_sentencepiece_model(self.model)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
      raise ValueError(f"{model_file!r} is not a SentencePiece model: {e}") from e
    if eos_id is None:
      raise ValueError(
        f"SentencePiece model {model_file!r} has no EOS piece; train it with eos_id >= 0"
      )
    _check_context_length(context_length, 1)
    self.model_file = model_file
    self.context_length = context_length
    self.num_pieces = len(pieces)
    self.start_id = None
    self.end_id = self.eos_id = eos_id
    self.pad_id = self.num_pieces if pad_id is None else pad_id
    self.starts_word = np.array([p.startswith(WORD_START) for p in pieces], bool)
    self._sentencepiece = None

  @property
  def vocab_size(self) -> int:
    return max(self.num_pieces, self.pad_id + 1)

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_sentencepiece"] = None
    return state

  def _encode(self, texts: Sequence[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    if self._sentencepiece is None:
      tf = import_tensorflow()
      import tensorflow_text as tf_text

      self._sentencepiece = tf_text.SentencepieceTokenizer(model=self.model, out_type=tf.int32)
    if not texts:
      return []
    encoded = []
    for ids in self._sentencepiece.tokenize(list(texts)).to_list():
      starts = self.starts_word[ids]
      starts[:1] = True  # The first piece starts a word even without a leading "▁".
      encoded.append((ids, (np.cumsum(starts) - 1).tolist()))
    return encoded


# ------------------------------------------------------------------------------ CLIP BPE


class ClipBpeTokenizer(_FixedLengthTokenizer):
  """Text -> fixed-length int32 ids as open_clip's tokenizer gives them:
  <start_of_text> pieces... <end_of_text> 0...

  `lower_case=False` skips CLIP's lower-casing (open_clip's clean="whitespace").
  As in CLIP, the special tokens' names typed in a text become the special tokens.
  """

  def __init__(self, merges_file: str, context_length: int, lower_case: bool = True):
    _check_context_length(context_length, 2)
    self.bpe = clip_bpe.ClipBpe(merges_file, lower_case=lower_case)
    self.context_length = context_length
    self.pad_id = 0
    self.start_id = self.bpe.start_id
    self.end_id = self.bpe.end_id

  @property
  def vocab_size(self) -> int:
    return self.bpe.vocab_size

  def _encode(self, texts: Sequence[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    return [self.bpe.encode(text, max_tokens) for text in texts]


def create_tokenizer(
  kind: str, vocab_file: str, context_length: int, lower_case: bool = True
) -> Tokenizer:
  """The `config.data.tokenizer` tokeniser over `config.data.vocab_file`.

  `vocab_file` is a WordPiece vocab (one token per line), a SentencePiece `.model` file
  or CLIP's BPE merges file, respectively.
  """
  if kind not in TOKENIZER_KINDS:
    raise ValueError(f"config.data.tokenizer={kind!r} is not one of {TOKENIZER_KINDS}")
  if not os.path.isfile(vocab_file):
    raise FileNotFoundError(f"config.data.vocab_file: {vocab_file!r} does not exist ({kind})")
  if kind == "wordpiece":
    return WordPieceTokenizer(read_vocab(vocab_file), context_length, lower_case)
  if kind == "sentencepiece":
    return SentencePieceTokenizer(vocab_file, context_length)
  return ClipBpeTokenizer(vocab_file, context_length, lower_case)


# ------------------------------------------------------------------------- vocab files

# OpenAI CLIP's BPE merges (MIT licence), the file open_clip installs, shipped with the
# package so that tokenizer "clip_bpe" needs no vocab file.
CLIP_BPE_MERGES = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz"
)
LEARNED_VOCAB_FILE = "vocab.txt"  # In the workdir: learned from the training captions.
LEARNED_VOCAB_SIZE = 30_522  # An upper bound (BERT's size); small caption sets give fewer.
# Records whose captions the vocab is learned from, spread over all shards: enough for a
# caption vocabulary, and a bounded read of (mostly image) bytes on big datasets.
LEARNED_VOCAB_RECORDS = 50_000


def default_vocab_file(kind: str) -> str | None:
  """The vocab file of tokenizer `kind` when config.data.vocab_file is "": CLIP's packaged
  merges for "clip_bpe"; None for "wordpiece" and "sentencepiece", which ship none."""
  if kind not in TOKENIZER_KINDS:
    raise ValueError(f"config.data.tokenizer={kind!r} is not one of {TOKENIZER_KINDS}")
  return CLIP_BPE_MERGES if kind == "clip_bpe" else None


def shard_captions(shards: Sequence[str], max_records: int) -> list[str]:
  """The captions of up to `max_records` records spread evenly over `shards` (ArrayRecord);
  undecodable records are skipped, as the training pipeline skips them."""
  import grain

  source = grain.sources.ArrayRecordDataSource(list(shards))
  picked = np.unique(np.linspace(0, len(source) - 1, min(len(source), max_records)).round())
  captions: list[str] = []
  for data in source.__getitems__([int(i) for i in picked]):
    try:
      captions += records.decode_record(data)["captions"]
    except records.RecordError:
      continue
  return captions


def ensure_learned_vocab(
  workdir: str,
  shards: Sequence[str],
  *,
  vocab_size: int = LEARNED_VOCAB_SIZE,
  lower_case: bool = True,
  max_records: int = LEARNED_VOCAB_RECORDS,
) -> str:
  """<workdir>/vocab.txt: a WordPiece vocab learned from the captions of `shards` the first
  time, reused afterwards (a resumed run, eval.py); returns its path."""
  path = os.path.join(workdir, LEARNED_VOCAB_FILE)
  if os.path.isfile(path):
    logging.info("WordPiece vocab: %s (learned from the training captions)", path)
    return path
  captions = shard_captions(shards, max_records)
  if not captions:
    raise ValueError("the training shards hold no caption to learn a WordPiece vocab from")
  vocab = learn_wordpiece_vocab(captions, vocab_size, lower_case)
  save_vocab(path, vocab)
  logging.info(
    "Learned a %d-token WordPiece vocab from %d training captions: %s "
    "(config.data.vocab_file names another vocab)",
    len(vocab),
    len(captions),
    path,
  )
  return path
