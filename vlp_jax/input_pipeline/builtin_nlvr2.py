"""The built-in NLVR2 set (builtin_tasks.py), as jsonl + images.

NLVR2, as jsonl + images: each set is one statement ("the left image has more circles
than the right image", "both images contain a red shape", "the right image contains a
small square", "the left image has fewer shapes than the right image", "there are four
shapes in total") paired with two image pairs, one making it true and one false: labels
are balanced and consistency (all pairs of a sentence right) means something; a set may
keep some kinds only (`kinds`: colours alone need no counting). Training
images lie in numbered subdirectories named by a "directory" field, as NLVR2's do; like
many of NLVR2's images they are JPEG bytes under .png names (decoders read the bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os

import numpy as np

from vlp_jax.input_pipeline import builtin, nlvr2_data
from vlp_jax.input_pipeline.builtin import COLOUR_NAMES, SHAPES, SIZES, Scene
from vlp_jax.input_pipeline.builtin_tasks import SPLIT_SEEDS, ensure_cached, pick, plural

_NLVR2_VERSION = 2  # 2: totals in words (version 1's digits were [UNK] to the demo).
NLVR2_SPLITS = ("train", "dev")
NLVR2_TRAIN_DIRECTORIES = 10  # numbered image subdirectories of the training split
_MAX_PAIR_TRIES = 100


@dataclasses.dataclass(frozen=True)
class Statement:
  """An NLVR2-style statement about a (left, right) pair of scenes."""

  kind: str  # "more", "both_colour", "contains", "fewer_shapes" or "total"
  side: str = "left"  # the image a one-sided statement is about
  colour: str = ""
  shape: str = ""
  size: str = ""
  number: int = 0

  @property
  def other(self) -> str:
    return "right" if self.side == "left" else "left"

  def text(self) -> str:
    return {
      "more": f"the {self.side} image has more {plural(self.shape)} than the {self.other} image",
      "both_colour": f"both images contain a {self.colour} shape",
      "contains": f"the {self.side} image contains a {self.size} {self.shape}",
      "fewer_shapes": f"the {self.side} image has fewer shapes than the {self.other} image",
      "total": f"there are {_NUMBER_WORDS[self.number]} shapes in total",
    }[self.kind]

  def holds(self, left: Scene, right: Scene) -> bool:
    this, other = (left, right) if self.side == "left" else (right, left)
    if self.kind == "more":
      return _count(this, self.shape) > _count(other, self.shape)
    if self.kind == "both_colour":
      return all(any(o.colour == self.colour for o in s.objects) for s in (left, right))
    if self.kind == "contains":
      return any(o.size == self.size and o.shape == self.shape for o in this.objects)
    if self.kind == "fewer_shapes":
      return len(this.objects) < len(other.objects)
    if self.kind == "total":
      return len(left.objects) + len(right.objects) == self.number
    raise ValueError(f"unknown statement kind {self.kind!r}")


STATEMENT_KINDS = ("more", "both_colour", "contains", "fewer_shapes", "total")
# "there are N shapes in total", N of two scenes' 2..6 shapes, 6 left out: statements use
# only letters the built-in captions spell (test_vqa_nlvr2.py), or the demo's vocabulary,
# learned from those captions, reads [UNK] (digits; the "x" of "six") and N is unreadable.
_TOTALS = (2, 6)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


def statement_kind(sentence: str) -> str:
  """The kind (STATEMENT_KINDS) of a sentence the generator wrote; "" for any other."""
  return _sentence_kinds().get(sentence, "")


@functools.cache
def _sentence_kinds() -> dict[str, str]:
  """Every sentence the generator can write (a few thousand) -> its kind."""
  sides = ("left", "right")
  choices = itertools.product(
    STATEMENT_KINDS, sides, COLOUR_NAMES, SHAPES, tuple(SIZES), range(*_TOTALS)
  )
  return {Statement(*choice).text(): choice[0] for choice in choices}


def _count(scene: Scene, shape: str) -> int:
  return sum(o.shape == shape for o in scene.objects)


def random_statement(
  rng: np.random.Generator, kinds: tuple[str, ...] = STATEMENT_KINDS
) -> Statement:
  return Statement(
    kind=pick(rng, kinds),
    side=pick(rng, ("left", "right")),
    colour=pick(rng, COLOUR_NAMES),
    shape=pick(rng, SHAPES),
    size=pick(rng, tuple(SIZES)),
    number=int(rng.integers(*_TOTALS)),
  )


def generate_nlvr2_set(
  seed: int,
  split: str,
  set_id: int,
  image_size: int,
  kinds: tuple[str, ...] = STATEMENT_KINDS,
) -> list[dict]:
  """One statement (of one of `kinds`) with a true and a false image pair (in random
  order), fully determined by (seed, split, set_id, kinds): examples with their
  identifiers and images."""
  rng = np.random.default_rng([seed, SPLIT_SEEDS[split], set_id])
  while True:
    statement = random_statement(rng, kinds)
    pairs: dict[bool, tuple[Scene, Scene]] = {}
    for _ in range(_MAX_PAIR_TRIES):
      pair = (builtin.sample_scene(rng, False), builtin.sample_scene(rng, False))
      pairs.setdefault(statement.holds(*pair), pair)
      if len(pairs) == 2:
        break
    if len(pairs) == 2:
      break
  labels = [True, False] if rng.uniform() < 0.5 else [False, True]
  examples = []
  for pair_id, label in enumerate(labels):
    stem = f"{split}-{set_id}-{pair_id}"
    examples.append(
      {
        "identifier": f"{stem}-0",
        "sentence": statement.text(),
        "label": label,
        "stem": stem,
        "images": [builtin.render(scene, image_size, rng) for scene in pairs[label]],
      }
    )
  return examples


def _write_nlvr2(
  root: str, seed: int, counts: dict[str, int], image_size: int, kinds: tuple[str, ...]
) -> None:
  for split, count in counts.items():
    lines = []
    for set_id in range(math.ceil(count / 2)):
      examples = generate_nlvr2_set(seed, split, set_id, image_size, kinds)
      for example in examples[: count - 2 * set_id]:
        entry = {
          "identifier": example["identifier"],
          "sentence": example["sentence"],
          "label": str(example["label"]),  # "True" / "False", as NLVR2's
        }
        folder = os.path.join(root, "images", split)
        if split == "train":
          entry["directory"] = set_id % NLVR2_TRAIN_DIRECTORIES
          folder = os.path.join(folder, str(entry["directory"]))
        os.makedirs(folder, exist_ok=True)
        for side, image in zip(("img0", "img1"), example["images"]):
          with open(os.path.join(folder, f"{example['stem']}-{side}.png"), "wb") as f:
            f.write(builtin.encode_jpeg(image))
        lines.append(json.dumps(entry))
    with open(os.path.join(root, f"{split}.json"), "w") as f:
      f.write("".join(f"{line}\n" for line in lines))


@dataclasses.dataclass(frozen=True)
class BuiltinNlvr2:
  """Where a generated NLVR2 set lies."""

  root: str
  train_file: str
  dev_file: str
  train_images: str
  dev_images: str

  def examples(self, split: str) -> list[nlvr2_data.Nlvr2Example]:
    """read_nlvr2 of split "train" or "dev"."""
    if split not in NLVR2_SPLITS:
      raise ValueError(f"split {split!r} is not one of {list(NLVR2_SPLITS)}")
    if split == "train":
      return nlvr2_data.read_nlvr2(self.train_file, self.train_images)
    return nlvr2_data.read_nlvr2(self.dev_file, self.dev_images)


def ensure_builtin_nlvr2(
  cache_dir: str | None,
  *,
  num_train: int,
  num_dev: int,
  image_size: int,
  seed: int,
  kinds: tuple[str, ...] = STATEMENT_KINDS,
) -> BuiltinNlvr2:
  """The generated NLVR2 set with `num_train` / `num_dev` examples (two per statement),
  its statements of `kinds` (STATEMENT_KINDS), written once."""
  if num_train < 1 or num_dev < 1:
    raise ValueError(f"num_train={num_train} and num_dev={num_dev} must be positive")
  unknown = [k for k in kinds if k not in STATEMENT_KINDS]
  if unknown or not kinds:
    raise ValueError(f"statement kinds {list(kinds)}: give some of {list(STATEMENT_KINDS)}")
  counts = {"train": num_train, "dev": num_dev}
  params = dict(
    version=_NLVR2_VERSION, seed=seed, num_train=num_train, num_dev=num_dev, image_size=image_size
  )
  if tuple(kinds) != STATEMENT_KINDS:  # The default keeps the sets already written.
    params["kinds"] = list(kinds)
  root = ensure_cached(
    cache_dir,
    "builtin-nlvr2",
    params,
    lambda tmp: _write_nlvr2(tmp, seed, counts, image_size, tuple(kinds)),
  )
  return BuiltinNlvr2(
    root=root,
    train_file=os.path.join(root, "train.json"),
    dev_file=os.path.join(root, "dev.json"),
    train_images=os.path.join(root, "images", "train"),
    dev_images=os.path.join(root, "images", "dev"),
  )
