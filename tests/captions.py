"""A deterministic generator of varied, awkward captions for tokeniser tests.

Plain alt-text style captions mixed with what real web captions carry: accents (composed
and NFD), CJK and other scripts, emoji sequences, punctuation runs, HTML entities,
mojibake, control and zero-width characters, very long words and over-long texts.
"""

from __future__ import annotations

import random
import unicodedata

# fmt: off
NOUNS = (
  "dog", "cat", "bicycle", "skateboarder", "giraffe", "kitchen", "umbrella", "mountain",
  "child", "train", "pizza", "sunset", "harbour", "laptop", "woman", "man", "zebra", "boat",
  "photograph", "street", "cathedral", "surfboard", "elephant", "sandwich", "tennis racket",
)
ADJECTIVES = (
  "red", "small", "old", "shiny", "wooden", "blurry", "happy", "enormous", "striped",
  "colourful", "unbelievably", "pre-owned", "hand-made", "black and white", "vintage",
)
VERBS = (
  "sitting on", "running across", "next to", "holding", "looking at", "parked by",
  "jumping over", "eating", "covered in", "reflected in", "under", "between two",
)
ACCENTED = (
  "café", "naïve", "résumé", "Ångström", "Zoë", "jalapeño", "Straße", "façade", "crème brûlée",
  "São Paulo", "Dvořák", "Łódź", "İstanbul", "ıspanak", "Ærø", "smörgåsbord", "piñata",
)
SCRIPTS = (
  "东京的夜景", "一只猫坐在桌子上", "日本語のキャプション", "カタカナとひらがな", "한국어 설명",
  "서울의 거리", "Привет, мир", "Москва зимой", "Καλημέρα κόσμε", "ΟΔΟΣ ΣΑΣ", "مرحبا بالعالم",
  "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ", "ქართული", "Xin chào thế giới", "ﾊﾝｶｸ ｶﾀｶﾅ",
)
EMOJI = (
  "😀", "🐶🐱", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "☕", "🎉🎉🎉", "🏳️‍🌈", "✨ sparkle ✨",
  "😂😂", "🔥", "🙂", "🍕 + 🍺", "🫠🥲",
)
PUNCTUATION = (
  "!!!", "...", "?!", "--", "—", "–", "…", "“quoted”", "‘single’", "(parens)", "[brackets]",
  "{braces}", "a/b", "x_y", "#hashtag", "@someone", "50%", "$5.99", "€20", "3.14", "1,000,000",
  "it's", "don't", "we'LL", "they're", "I'd", "you've", "O'Neil's", "rock'n'roll", "e-mail",
  "¿qué?", "¡hola!", "«guillemets»", "<b>bold</b>", "a<b", "~tilde~", "`tick`", "^_^", ":-)",
  "https://example.com/img_01.jpg?w=640&h=480", "C++", "A&B",
)
ENTITIES = (
  "&amp;", "&lt;3", "&gt;", "&quot;hi&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;",
  "&eacute;t&eacute;", "&copy; 2021", "Tom &amp; Jerry", "&#8217;s", "&hellip;", "&bogus;",
)
ODD_CHARACTERS = (
  "\x00", "\x07", "\t", "\n", "\r\n", "\x0b", "\x1b[31m", "\u200b", "\ufeff", "\u00ad",
  "\ufffd", "\u2028", "\u00a0", "\u3000", "ﬁne", "ﬂower", "x²", "Ⅻ", "\u212a", "ſ", "ＡＢＣ",
  "１２３", "Ⓐ", "℃", "½", "ß", "ǅ", "\u0301", "\U0001d400", "\x7f", "\x85",
)
LONG_WORDS = (
  "a" * 101,
  "supercalifragilistic" * 6,
  "Ж" * 60,
  "ü" * 120,
  "pneumonoultramicroscopicsilicovolcanoconiosis",
  "x" * 99 + "y",
  "日" * 150,
)
# fmt: on


def _mojibake(text: str, rng: random.Random) -> str:
  """Text whose UTF-8 bytes were decoded with a Western single-byte code page."""
  encoding = rng.choice(("latin-1", "cp1252"))
  return text.encode("utf-8").decode(encoding, errors="replace")


def _plain(rng: random.Random) -> str:
  text = (
    f"{rng.choice(('a', 'the', 'two', 'A', 'The'))} {rng.choice(ADJECTIVES)} "
    f"{rng.choice(NOUNS)} {rng.choice(VERBS)} {rng.choice(('a', 'the'))} {rng.choice(NOUNS)}"
  )
  style = rng.random()
  if style < 0.1:
    return text.upper()
  if style < 0.2:
    return text.title()
  return text


def _fragment(kind: int, rng: random.Random) -> str:
  if kind == 0:
    return _plain(rng)
  if kind == 1:
    return " ".join(rng.choices(ACCENTED, k=rng.randint(1, 3)))
  if kind == 2:
    return rng.choice(SCRIPTS)
  if kind == 3:
    return rng.choice(EMOJI)
  if kind == 4:
    return "".join(rng.choices(PUNCTUATION, k=rng.randint(1, 3)))
  if kind == 5:
    return rng.choice(ENTITIES)
  if kind == 6:
    return _mojibake(rng.choice((*ACCENTED, "it’s “fine”", "naïve café", "日本")), rng)
  if kind == 7:
    return rng.choice(ODD_CHARACTERS) + rng.choice(("", "word", " ", "Ab"))
  if kind == 8:
    return unicodedata.normalize("NFD", " ".join(rng.choices(ACCENTED, k=2)))
  if kind == 9:
    return rng.choice(LONG_WORDS)
  return " ".join(_plain(rng) for _ in range(rng.randint(8, 20)))  # Over-long.


NUM_KINDS = 11


def generate_captions(count: int = 1_000, seed: int = 0) -> list[str]:
  """`count` captions, the same for a seed. Every kind of fragment appears in each run of
  `NUM_KINDS` captions; a few captions are empty or whitespace only."""
  rng = random.Random(seed)
  captions = []
  for i in range(count):
    if i % 97 == 5:
      captions.append(rng.choice(("", " ", "\n\t ", "!!!", "&amp;")))
      continue
    kinds = [i % NUM_KINDS] + [rng.randrange(NUM_KINDS) for _ in range(rng.randint(0, 2))]
    rng.shuffle(kinds)
    separators = (" ", " ", " ", "", ", ", "  ", "\t", " - ")
    text = ""
    for kind in kinds:
      text += rng.choice(separators) + _fragment(kind, rng)
    captions.append(text.strip(" ") if rng.random() < 0.8 else text)
  return captions
