"""CLIP's byte-level BPE, read from its merges file (`bpe_simple_vocab_16e6.txt.gz`).

Gives the ids of OpenAI CLIP's and open_clip's default tokenizer: the same text cleaning
(ftfy, HTML unescaping, whitespace collapse, lower-casing), pre-tokeniser and merges.

Vocabulary layout: the 256 byte symbols, the same followed by the end-of-word marker
`</w>`, one token per merge in rank order, then <start_of_text> and <end_of_text>.
"""

from __future__ import annotations

import gzip
import html
import itertools
import os

import ftfy
import regex

# CLIP keeps the first 49152 - 256 - 2 merges of the file: a 49,152-token BPE vocabulary
# less the 256 byte symbols and the two special tokens (which makes 49,408 in all).
CLIP_NUM_MERGES = 49_152 - 256 - 2
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"

# Pre-tokeniser: English contractions, letter runs, single digits, runs of anything else
# that is not white space. The special tokens come first so that they match whole.
_WORDS = regex.compile(
  "|".join(map(regex.escape, (START_OF_TEXT, END_OF_TEXT)))
  + r"|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
  regex.IGNORECASE,
)
# Text that ftfy and HTML unescaping leave as it is: printable ASCII without '&', plus
# tabs and newlines. Everything else goes through ftfy (much slower).
_NEEDS_FIXING = regex.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def byte_symbols() -> dict[int, str]:
  """The symbol standing for each byte, in vocabulary order (dicts keep insertion order).

  Bytes that are printable Latin-1 characters stand for themselves and come first; the
  rest (controls, space, soft hyphen...) take the code points from 256 upwards, in byte
  order, so that no symbol is white space or a control character.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  printable += range(ord("®"), ord("ÿ") + 1)
  symbols = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in symbols]
  symbols.update({b: chr(256 + n) for n, b in enumerate(others)})
  return symbols


def read_merges(path: str, num_merges: int = CLIP_NUM_MERGES) -> list[tuple[str, str]]:
  """The first `num_merges` merges, by rank, of a (gzipped) merges file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"BPE merges file {path!r} does not exist")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  # The first line is a version header.
  merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]
  if len(merges) < num_merges or any(len(m) != 2 for m in merges):
    raise ValueError(f"{path!r} does not hold {num_merges} BPE merges ('left right' lines)")
  return merges


def clean_text(text: str, lower_case: bool = True) -> str:
  """CLIP's text cleaning: repair mojibake and odd characters, unescape HTML (twice),
  collapse white space, lower-case."""
  if _NEEDS_FIXING.search(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  text = " ".join(text.split())
  return text.lower() if lower_case else text


class ClipBpe:
  """Text -> CLIP BPE ids (no special tokens added), with the word of each id.

  BPE results are cached per pre-tokenised word; the cache is emptied when it grows past
  `max_cache_words`, which bounds memory on an open-ended stream of captions.
  """

  def __init__(
    self,
    merges_file: str,
    lower_case: bool = True,
    num_merges: int = CLIP_NUM_MERGES,
    max_cache_words: int = 200_000,
  ):
    merges = read_merges(merges_file, num_merges)
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    vocab += [START_OF_TEXT, END_OF_TEXT]
    self.token_ids = {token: i for i, token in enumerate(vocab)}
    self.merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
    self.vocab_size = len(vocab)
    self.start_id = self.token_ids[START_OF_TEXT]
    self.end_id = self.token_ids[END_OF_TEXT]
    self.lower_case = lower_case
    self.max_cache_words = max_cache_words
    # Latin-1 decoding turns each byte b into chr(b); this table then maps it to its symbol.
    self._byte_table = str.maketrans({chr(b): s for b, s in byte_symbols().items()})
    self._cache: dict[str, tuple[int, ...]] = {}

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def _merge(self, word: str) -> list[str]:
    """Applies the merges to one word, lowest rank first, until none applies."""
    parts = [*word[:-1], word[-1] + END_OF_WORD]
    ranks = self.merge_ranks
    while len(parts) > 1:
      pairs = set(itertools.pairwise(parts))
      best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
      if best not in ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def _word_ids(self, word: str) -> tuple[int, ...]:
    ids = self._cache.get(word)
    if ids is None:
      if word in (START_OF_TEXT, END_OF_TEXT):
        ids = (self.token_ids[word],)
      else:
        symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
        ids = tuple(self.token_ids[part] for part in self._merge(symbols))
      self._cache[word] = ids
    return ids

  def encode(self, text: str, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Ids of `text` and, for each id, the index of its pre-tokenised word.

    Stops after `max_tokens` ids (the rest would be truncated anyway).
    """
    if len(self._cache) > self.max_cache_words:
      self._cache = {}  # Replaced, not cleared, for threads using it.
    ids: list[int] = []
    word_ids: list[int] = []
    for index, word in enumerate(_WORDS.findall(clean_text(text, self.lower_case))):
      pieces = self._word_ids(word)
      ids.extend(pieces)
      word_ids.extend([index] * len(pieces))
      if max_tokens is not None and len(ids) >= max_tokens:
        break
    return ids, word_ids
