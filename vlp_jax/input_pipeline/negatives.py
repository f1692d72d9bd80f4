"""Hard-negative captions for NegCLIP: part-of-speech tagging and swapped-word negatives.

A *swapped* negative caption trades two words of the same part of speech (noun,
adjective, verb, adverb), or two noun phrases ("a red circle left of a blue square" ->
"a blue circle left of a red square"), so only word order tells it from the caption.
Tags come from a `Tagger`: spaCy's when a spaCy model is installed (`pip install spacy
&& python -m spacy download en_core_web_sm`), otherwise a lexicon, by default the
built-in dataset's (`builtin_lexicon`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
from absl import logging

from vlp_jax.input_pipeline import builtin

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
