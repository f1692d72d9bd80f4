"""The built-in dataset: procedurally drawn scenes with compositional captions.

Each image holds one to three flat shapes with a size, colour and position, captioned
e.g. "a small red circle left of a large blue square". Everything is deterministic from
a seed. The held-out split uses colour-shape pairs that never occur in training, and
every held-out caption carries compositional negatives (swap attributes, replace an
attribute, a relation or an object), SugarCrepe style.

The splits are written once to ArrayRecord shards in a cache directory (with a WordPiece
vocabulary learned from the training captions) and read through the normal pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import tempfile

import numpy as np
from absl import logging
from PIL import Image

from vlp_jax.input_pipeline import records, tokenizers

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 190, 60),
  "blue": (50, 80, 230),
  "yellow": (235, 220, 50),
  "purple": (150, 60, 200),
  "orange": (245, 140, 30),
  "white": (240, 240, 240),
}
SIZES = {"small": 0.09, "large": 0.17}  # radius as a share of the image side
RELATIONS = ("left of", "right of", "above", "below")
COLOUR_NAMES = tuple(COLOURS)
# Every word the captions use, by class: what a masking agent's choices are reported by
# (image-grounded classes against function words).
WORD_CLASSES = {
  "colour": COLOUR_NAMES,
  "shape": SHAPES,
  "size": tuple(SIZES),
  "relation": ("left", "right", "of", "above", "below"),
  "function": ("a", "which", "is", ","),
}
# One held-out shape per colour: every colour and every shape still occurs in training.
HELDOUT_PAIRS = frozenset((c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOUR_NAMES))
NEGATIVE_KINDS = ("swap_att", "replace_att", "replace_rel", "replace_obj")
# Scenes of 1, 2, 3 objects. Few single objects: their captions repeat, which caps recall.
NUM_OBJECTS_PROBS = (0.2, 0.4, 0.4)
_GENERATOR_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Shape:
  size: str
  colour: str
  shape: str
  cx: float = 0.0
  cy: float = 0.0

  def phrase(self) -> str:
    return f"a {self.size} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Shape, ...]
  relations: tuple[str, ...]  # relations[i] relates objects[i] to objects[i + 1]


@dataclasses.dataclass(frozen=True)
class BuiltinData:
  train_shards: list[str]
  heldout_shards: list[str]
  vocab_file: str
  num_train: int
  num_heldout: int


def caption(scene: Scene) -> str:
  objs, rels = scene.objects, scene.relations
  text = objs[0].phrase()
  if len(objs) >= 2:
    text += f" {rels[0]} {objs[1].phrase()}"
  if len(objs) == 3:
    text += f", which is {rels[1]} {objs[2].phrase()}"
  return text


def relation_holds(relation: str, a: Shape, b: Shape) -> bool:
  """`a relation b` in image coordinates (y grows downwards), dominant axis only."""
  dx, dy = a.cx - b.cx, a.cy - b.cy
  horizontal = abs(dx) > abs(dy)
  return {
    "left of": horizontal and dx < 0,
    "right of": horizontal and dx > 0,
    "above": not horizontal and dy < 0,
    "below": not horizontal and dy > 0,
  }[relation]


def _sample_attributes(rng: np.random.Generator, heldout: bool) -> tuple[str, str, str]:
  while True:
    colour, shape = COLOUR_NAMES[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    if ((colour, shape) in HELDOUT_PAIRS) == heldout:
      return str(rng.choice(list(SIZES))), colour, shape


def sample_scene(rng: np.random.Generator, heldout: bool) -> Scene:
  """Samples objects, relations and non-overlapping positions that satisfy the relations."""
  while True:
    num = 1 + int(rng.choice(3, p=NUM_OBJECTS_PROBS))
    # Held-out scenes contain at least one held-out pair; training scenes none.
    attrs = [_sample_attributes(rng, heldout and i == 0) for i in range(num)]
    if heldout:
      rng.shuffle(attrs)
    rels = tuple(str(r) for r in rng.choice(RELATIONS, size=num - 1))
    for _ in range(200):
      objs = []
      for size, colour, shape in attrs:
        r = SIZES[size]
        objs.append(Shape(size, colour, shape, *rng.uniform(r, 1 - r, size=2)))
      apart = all(
        np.hypot(a.cx - b.cx, a.cy - b.cy) > SIZES[a.size] + SIZES[b.size] + 0.02
        for i, a in enumerate(objs)
        for b in objs[i + 1 :]
      )
      if apart and all(relation_holds(r, objs[i], objs[i + 1]) for i, r in enumerate(rels)):
        return Scene(tuple(objs), rels)


@functools.cache
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = (np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5) / image_size
  return xx, yy


def shape_mask(shape: Shape, image_size: int) -> np.ndarray:
  xx, yy = _pixel_centres(image_size)
  x, y = xx - shape.cx, yy - shape.cy
  r = SIZES[shape.size]
  if shape.shape == "circle":
    return x * x + y * y <= r * r
  if shape.shape == "square":
    return (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
  if shape.shape == "diamond":
    return np.abs(x) + np.abs(y) <= 1.1 * r
  if shape.shape == "triangle":  # apex up, base at y = 0.8 r
    inside_rows = (y >= -r) & (y <= 0.8 * r)
    return inside_rows & (np.abs(x) <= (y + r) / 1.8)
  if shape.shape == "cross":
    arm = 0.3 * r
    return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
  raise ValueError(f"unknown shape {shape.shape!r}")


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Dark textured background with flat-coloured shapes; uint8 (S, S, 3)."""
  background = rng.uniform(20, 70)
  image = background + rng.normal(0, 4, size=(image_size, image_size, 3))
  for obj in scene.objects:
    image[shape_mask(obj, image_size)] = COLOURS[obj.colour]
  return np.clip(image, 0, 255).astype(np.uint8)


def negatives(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
  """Hard negative captions that keep the words but break the composition."""
  objs, rels = list(scene.objects), scene.relations
  out: dict[str, str] = {}

  def with_objects(new_objs: list[Shape], new_rels: tuple[str, ...] = rels) -> str:
    return caption(Scene(tuple(new_objs), new_rels))

  swappable = [
    (i, j, field)
    for i in range(len(objs))
    for j in range(i + 1, len(objs))
    for field in ("colour", "size")
    if getattr(objs[i], field) != getattr(objs[j], field)
  ]
  if swappable:
    i, j, field = swappable[rng.integers(len(swappable))]
    swapped = list(objs)
    swapped[i] = dataclasses.replace(objs[i], **{field: getattr(objs[j], field)})
    swapped[j] = dataclasses.replace(objs[j], **{field: getattr(objs[i], field)})
    out["swap_att"] = with_objects(swapped)
  k = int(rng.integers(len(objs)))
  others = [c for c in COLOUR_NAMES if c != objs[k].colour]
  out["replace_att"] = with_objects(
    [*objs[:k], dataclasses.replace(objs[k], colour=str(rng.choice(others))), *objs[k + 1 :]]
  )
  if rels:
    k_rel = int(rng.integers(len(rels)))
    new_rel = str(rng.choice([r for r in RELATIONS if r != rels[k_rel]]))
    out["replace_rel"] = with_objects(objs, (*rels[:k_rel], new_rel, *rels[k_rel + 1 :]))
  others = [s for s in SHAPES if s != objs[k].shape]
  out["replace_obj"] = with_objects(
    [*objs[:k], dataclasses.replace(objs[k], shape=str(rng.choice(others))), *objs[k + 1 :]]
  )
  return out


def encode_jpeg(image: np.ndarray) -> bytes:
  # JPEG like real web data, and 4x faster to write than PNG on these noisy backgrounds.
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=92)
  return buffer.getvalue()


def generate_example(seed: int, split: str, index: int, image_size: int) -> dict:
  """One example of a split, fully determined by (seed, split, index)."""
  heldout = split == "heldout"
  rng = np.random.default_rng([seed, int(heldout), index])
  scene = sample_scene(rng, heldout)
  example = {
    "key": f"{split}-{index:07d}",
    "image": render(scene, image_size, rng),
    "caption": caption(scene),
  }
  if heldout:
    example["negatives"] = negatives(scene, rng)
  return example


def _split_records(seed: int, split: str, count: int, image_size: int, captions: list[str]):
  for index in range(count):
    ex = generate_example(seed, split, index, image_size)
    captions.append(ex["caption"])
    extra = {"negatives": ex["negatives"]} if "negatives" in ex else {}
    yield records.encode_record(ex["key"], encode_jpeg(ex["image"]), ex["caption"], **extra)


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "vlp_jax")


def ensure_builtin(
  cache_dir: str | None,
  *,
  seed: int,
  num_train: int,
  num_heldout: int,
  image_size: int,
  vocab_size: int,
  num_shards: int = 4,
) -> BuiltinData:
  """Writes the built-in dataset once (atomically) and returns where it lies."""
  params = dict(
    version=_GENERATOR_VERSION,
    seed=seed,
    num_train=num_train,
    num_heldout=num_heldout,
    image_size=image_size,
    vocab_size=vocab_size,
    num_shards=num_shards,
  )
  digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  root = os.path.join(cache_dir or default_cache_dir(), f"builtin-{digest}")
  if not os.path.exists(os.path.join(root, "params.json")):
    os.makedirs(os.path.dirname(root), exist_ok=True)
    logging.info(
      "Writing the built-in dataset (%d train, %d held-out) to %s", num_train, num_heldout, root
    )
    tmp = tempfile.mkdtemp(prefix=".builtin-", dir=os.path.dirname(root))
    train_captions: list[str] = []
    train = _split_records(seed, "train", num_train, image_size, train_captions)
    records.write_shards(train, tmp, "train", num_shards)
    heldout = _split_records(seed, "heldout", num_heldout, image_size, [])
    records.write_shards(heldout, tmp, "heldout", 1)
    vocab = tokenizers.learn_wordpiece_vocab(train_captions, vocab_size)
    tokenizers.save_vocab(os.path.join(tmp, "vocab.txt"), vocab)
    with open(os.path.join(tmp, "params.json"), "w") as f:
      json.dump(params, f)  # Written last: its presence marks a complete dataset.
    records.replace_dir_atomically(tmp, root)
  return BuiltinData(
    train_shards=records.resolve_shards(os.path.join(root, "train-*")),
    heldout_shards=records.resolve_shards(os.path.join(root, "heldout-*")),
    vocab_file=os.path.join(root, "vocab.txt"),
    num_train=num_train,
    num_heldout=num_heldout,
  )
