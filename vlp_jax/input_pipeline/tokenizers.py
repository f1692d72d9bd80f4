"""Text tokenisers. WordPiece (BERT-style) runs on tensorflow-text's FastBertTokenizer.

Tokenisers are picklable: the TensorFlow objects are built lazily in whichever process
(trainer or grain worker) first calls them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

RESERVED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def import_tensorflow():
  """Imports TensorFlow for host-side text ops only: no GPU memory grab, one thread."""
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:
    pass  # Already initialised in this process; the settings above were applied then.
  return tf


def read_vocab(path: str) -> list[str]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"vocab file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    vocab = [line.rstrip("\n") for line in f]
  if not vocab:
    raise ValueError(f"vocab file {path!r} is empty")
  return vocab


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


class WordPieceTokenizer:
  """Text -> fixed-length int32 ids: [CLS] pieces... [SEP] [PAD]...

  Over-long texts are truncated before [SEP], so the end-of-text token always survives
  (the text tower pools it).
  """

  def __init__(self, vocab: Sequence[str], context_length: int, lower_case: bool = True):
    missing = [t for t in RESERVED_TOKENS[:4] if t not in vocab]
    if missing:
      raise ValueError(f"WordPiece vocab lacks the special tokens {missing}")
    if vocab[0] != "[PAD]":
      raise ValueError("WordPiece vocab must have [PAD] at id 0")
    if context_length < 3:
      raise ValueError(f"context_length {context_length} leaves no room for text")
    self.vocab = list(vocab)
    self.context_length = context_length
    self.lower_case = lower_case
    self.cls_id = self.vocab.index("[CLS]")
    self.sep_id = self.vocab.index("[SEP]")
    self._tokenizer = None

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_tokenizer"] = None
    return state

  def _get_tokenizer(self):
    if self._tokenizer is None:
      tf = import_tensorflow()
      import tensorflow_text as tf_text

      self._tokenizer = tf_text.FastBertTokenizer(
        vocab=self.vocab,
        lower_case_nfd_strip_accents=self.lower_case,
        token_out_type=tf.int32,
        unknown_token="[UNK]",
      )
    return self._tokenizer

  def pieces(self, texts: Sequence[str]) -> list[list[int]]:
    """Word-piece ids without special tokens or padding."""
    return self._get_tokenizer().tokenize(list(texts)).to_list()

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Tokenises a list of texts into (len(texts), context_length) int32 ids."""
    out = np.zeros((len(texts), self.context_length), np.int32)
    room = self.context_length - 2
    for row, ids in zip(out, self.pieces(texts)):
      ids = [self.cls_id, *ids[:room], self.sep_id]
      row[: len(ids)] = ids
    return out


def create_tokenizer(
  vocab_file: str, context_length: int, lower_case: bool = True
) -> WordPieceTokenizer:
  return WordPieceTokenizer(read_vocab(vocab_file), context_length, lower_case)
