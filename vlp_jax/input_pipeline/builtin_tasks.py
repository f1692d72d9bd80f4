"""Built-in fine-tuning sets over the built-in scenes (builtin.py), written in the official
file formats so that the task readers (task_data.py) read them as they read the real ones.
Everything is deterministic from the seed; each set is written once to the cache
directory (atomically, versioned) and reused.

VQA, in VQAv2's layout: QUESTIONS_PER_IMAGE questions of different kinds per image:
"what colour is the circle?" (asked only when there is one circle), "what shape is the
red object?" (one red object), "how many shapes are there?", "how many squares are
there?" (0 too), "is the square left of the triangle?" (builtin.relation_holds: the
dominant axis decides; true half the time), "is there a red circle?" (half the time).
Ten simulated annotators answer each: one answers wrongly with WRONG_ANSWER_PROB (a
plausible other answer), and any answer is spelled differently with RESPELL_PROB
("two", "the red", "Yes", "circle.") in a way the official normalisation undoes.

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
import hashlib
import itertools
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable

import numpy as np
from absl import logging

from vlp_jax.input_pipeline import builtin, records, task_data
from vlp_jax.input_pipeline.builtin import COLOUR_NAMES, RELATIONS, SHAPES, SIZES, Scene

_VQA_VERSION = 1
_NLVR2_VERSION = 2  # 2: totals in words (version 1's digits were [UNK] to the demo).
QUESTIONS_PER_IMAGE = 3
NUM_ANNOTATORS = 10
WRONG_ANSWER_PROB = 0.1
RESPELL_PROB = 0.3
MAX_COUNT = 4  # Mistaken counts range over 0..MAX_COUNT.
NUMBER_SPELLINGS = {"0": ("none", "zero"), "1": ("one",), "2": ("two",), "3": ("three",)}
VQA_SPLITS = {"train": "train2014", "val": "val2014"}  # split -> VQAv2 data_subtype
# Image ids of the val split start here, so that train and val ids never collide (as
# COCO's), also when the two are trained on together.
_VAL_IMAGE_IDS = 10_000_000
NLVR2_SPLITS = ("train", "dev")
NLVR2_TRAIN_DIRECTORIES = 10  # numbered image subdirectories of the training split
_SPLIT_SEEDS = {"train": 0, "val": 1, "dev": 1}
_MAX_PAIR_TRIES = 100


def _plural(shape: str) -> str:
  return f"{shape}es" if shape.endswith("ss") else f"{shape}s"


def _others(values, value) -> tuple[str, ...]:
  return tuple(str(v) for v in values if str(v) != value)


def _pick(rng: np.random.Generator, items):
  return items[int(rng.integers(len(items)))]


# --------------------------------------------------------------------------------- VQA


@dataclasses.dataclass(frozen=True)
class VqaQuestion:
  question: str
  answer: str  # canonical: what normalize_answer makes of every spelling
  answer_type: str  # VQAv2's: "yes/no", "number", "other"
  question_type: str  # VQAv2-style: the question's opening words
  wrong: tuple[str, ...]  # what a mistaken annotator answers


def _colour_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion | None:
  counts = Counter(o.shape for o in scene.objects)
  candidates = [o for o in scene.objects if counts[o.shape] == 1]
  if not candidates:
    return None
  obj = _pick(rng, candidates)
  return VqaQuestion(
    f"what colour is the {obj.shape}?",
    obj.colour,
    "other",
    "what colour is the",
    _others(COLOUR_NAMES, obj.colour),
  )


def _shape_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion | None:
  counts = Counter(o.colour for o in scene.objects)
  candidates = [o for o in scene.objects if counts[o.colour] == 1]
  if not candidates:
    return None
  obj = _pick(rng, candidates)
  return VqaQuestion(
    f"what shape is the {obj.colour} object?",
    obj.shape,
    "other",
    "what shape is the",
    _others(SHAPES, obj.shape),
  )


def _count_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion:
  answer = str(len(scene.objects))
  wrong = _others(range(MAX_COUNT + 1), answer)
  return VqaQuestion("how many shapes are there?", answer, "number", "how many", wrong)


def _count_shape_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion:
  # Half the time a shape in the scene, else any shape (the answer may be 0).
  present = [o.shape for o in scene.objects]
  shape = _pick(rng, present) if rng.uniform() < 0.5 else _pick(rng, SHAPES)
  answer = str(present.count(shape))
  wrong = _others(range(MAX_COUNT + 1), answer)
  return VqaQuestion(f"how many {_plural(shape)} are there?", answer, "number", "how many", wrong)


def _relation_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion | None:
  counts = Counter(o.shape for o in scene.objects)
  unique = [o for o in scene.objects if counts[o.shape] == 1]
  if len(unique) < 2:
    return None
  i, j = rng.choice(len(unique), size=2, replace=False)
  a, b = unique[i], unique[j]
  holding = [r for r in RELATIONS if builtin.relation_holds(r, a, b)]
  failing = [r for r in RELATIONS if r not in holding]
  want = bool(holding) and (not failing or rng.uniform() < 0.5)
  relation = _pick(rng, holding if want else failing)
  answer = "yes" if want else "no"
  return VqaQuestion(
    f"is the {a.shape} {relation} the {b.shape}?",
    answer,
    "yes/no",
    "is the",
    _others(("yes", "no"), answer),
  )


def _exists_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion:
  present = {(o.colour, o.shape) for o in scene.objects}
  if rng.uniform() < 0.5:
    colour, shape = _pick(rng, sorted(present))
  else:
    absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
    colour, shape = _pick(rng, absent)
  answer = "yes" if (colour, shape) in present else "no"
  return VqaQuestion(
    f"is there a {colour} {shape}?", answer, "yes/no", "is there a", _others(("yes", "no"), answer)
  )


_QUESTION_KINDS: tuple[Callable[[Scene, np.random.Generator], VqaQuestion | None], ...] = (
  _colour_question,
  _shape_question,
  _count_question,
  _count_shape_question,
  _relation_question,
  _exists_question,
)


def vqa_questions(scene: Scene, rng: np.random.Generator) -> list[VqaQuestion]:
  """QUESTIONS_PER_IMAGE questions of different kinds about `scene` (count and existence
  questions always apply, so there are always enough)."""
  candidates = [q for q in (kind(scene, rng) for kind in _QUESTION_KINDS) if q is not None]
  chosen = rng.choice(len(candidates), size=QUESTIONS_PER_IMAGE, replace=False)
  return [candidates[i] for i in chosen]


def spellings(answer: str, answer_type: str) -> list[str]:
  """Other ways an annotator writes `answer`; normalize_answer maps each back."""
  forms = [answer.capitalize(), f"{answer}."]
  if answer_type == "number":
    forms += NUMBER_SPELLINGS.get(answer, ())
  elif answer_type == "yes/no":
    forms.append(f"{answer}!")
  else:
    forms.append(f"the {answer}")
  return forms


def annotate(question: VqaQuestion, rng: np.random.Generator) -> tuple[list[str], str]:
  """(ten annotators' answers as written, the most common canonical answer)."""
  written, canonical = [], []
  for _ in range(NUM_ANNOTATORS):
    answer = question.answer
    if rng.uniform() < WRONG_ANSWER_PROB:
      answer = _pick(rng, question.wrong)
    canonical.append(answer)
    if rng.uniform() < RESPELL_PROB:
      answer = _pick(rng, spellings(answer, question.answer_type))
    written.append(answer)
  return written, Counter(canonical).most_common(1)[0][0]


def generate_vqa_image(seed: int, split: str, index: int, image_size: int) -> dict:
  """One image of a split and its questions, fully determined by (seed, split, index)."""
  rng = np.random.default_rng([seed, _SPLIT_SEEDS[split], index])
  scene = builtin.sample_scene(rng, heldout=False)
  image_id = (_VAL_IMAGE_IDS if split == "val" else 0) + index + 1
  questions, annotations = [], []
  for k, question in enumerate(vqa_questions(scene, rng)):
    question_id = image_id * 1000 + k  # VQAv2's numbering
    answers, most_common = annotate(question, rng)
    questions.append(
      {"image_id": image_id, "question": question.question, "question_id": question_id}
    )
    annotations.append(
      {
        "question_type": question.question_type,
        "multiple_choice_answer": most_common,
        "answers": [
          {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
          for j, a in enumerate(answers)
        ],
        "image_id": image_id,
        "answer_type": question.answer_type,
        "question_id": question_id,
      }
    )
  image = builtin.render(scene, image_size, rng)
  return {"image_id": image_id, "image": image, "questions": questions, "annotations": annotations}


def vqa_file_names(split: str) -> tuple[str, str]:
  """(questions file, annotations file) of a split, VQAv2's names."""
  subtype = VQA_SPLITS[split]
  return (
    f"v2_OpenEnded_mscoco_{subtype}_questions.json",
    f"v2_mscoco_{subtype}_annotations.json",
  )


def _write_vqa(root: str, seed: int, counts: dict[str, int], image_size: int) -> None:
  info = {"description": "vlp_jax built-in VQA: generated questions about generated scenes"}
  for split, count in counts.items():
    subtype = VQA_SPLITS[split]
    os.makedirs(os.path.join(root, subtype))
    questions, annotations = [], []
    for index in range(count):
      generated = generate_vqa_image(seed, split, index, image_size)
      name = f"COCO_{subtype}_{generated['image_id']:012d}.jpg"
      with open(os.path.join(root, subtype, name), "wb") as f:
        f.write(builtin.encode_jpeg(generated["image"]))
      questions += generated["questions"]
      annotations += generated["annotations"]
    common = {"info": info, "license": {"name": "generated"}, "data_subtype": subtype}
    questions_file, annotations_file = vqa_file_names(split)
    with open(os.path.join(root, questions_file), "w") as f:
      json.dump(
        {**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}, f
      )
    with open(os.path.join(root, annotations_file), "w") as f:
      json.dump({**common, "data_type": "mscoco", "annotations": annotations}, f)


@dataclasses.dataclass(frozen=True)
class BuiltinVqa:
  """Where a generated VQA set lies; `image_root` is what read_vqa takes."""

  root: str
  image_root: str
  train_questions: str
  train_annotations: str
  val_questions: str
  val_annotations: str

  def examples(self, split: str) -> list[task_data.VqaExample]:
    """read_vqa of split "train" or "val"."""
    if split not in VQA_SPLITS:
      raise ValueError(f"split {split!r} is not one of {list(VQA_SPLITS)}")
    questions, annotations = self.train_questions, self.train_annotations
    if split == "val":
      questions, annotations = self.val_questions, self.val_annotations
    return task_data.read_vqa(questions, annotations, self.image_root)


# ------------------------------------------------------------------------------- NLVR2


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
      "more": f"the {self.side} image has more {_plural(self.shape)} than the {self.other} image",
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
    kind=_pick(rng, kinds),
    side=_pick(rng, ("left", "right")),
    colour=_pick(rng, COLOUR_NAMES),
    shape=_pick(rng, SHAPES),
    size=_pick(rng, tuple(SIZES)),
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
  rng = np.random.default_rng([seed, _SPLIT_SEEDS[split], set_id])
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

  def examples(self, split: str) -> list[task_data.Nlvr2Example]:
    """read_nlvr2 of split "train" or "dev"."""
    if split not in NLVR2_SPLITS:
      raise ValueError(f"split {split!r} is not one of {list(NLVR2_SPLITS)}")
    if split == "train":
      return task_data.read_nlvr2(self.train_file, self.train_images)
    return task_data.read_nlvr2(self.dev_file, self.dev_images)


# ------------------------------------------------------------------------------ writing


def _ensure(cache_dir: str | None, name: str, params: dict, write: Callable[[str], None]) -> str:
  """The directory of a generated set, written once: in a temporary directory that is
  renamed when complete (params.json, written last, marks it complete)."""
  digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  root = os.path.join(cache_dir or builtin.default_cache_dir(), f"{name}-{digest}")
  if not os.path.exists(os.path.join(root, "params.json")):
    os.makedirs(os.path.dirname(root), exist_ok=True)
    logging.info("Writing the %s set %s to %s", name, params, root)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(root))
    write(tmp)
    with open(os.path.join(tmp, "params.json"), "w") as f:
      json.dump(params, f)
    records.replace_dir_atomically(tmp, root)
  return root


def ensure_builtin_vqa(
  cache_dir: str | None, *, num_train: int, num_val: int, image_size: int, seed: int
) -> BuiltinVqa:
  """The generated VQA set with `num_train` / `num_val` images (QUESTIONS_PER_IMAGE
  questions each), written once."""
  if not 0 < num_train < _VAL_IMAGE_IDS or not 0 < num_val < _VAL_IMAGE_IDS:
    raise ValueError(
      f"num_train={num_train} and num_val={num_val} must be in 1..{_VAL_IMAGE_IDS - 1}"
    )
  counts = {"train": num_train, "val": num_val}
  params = dict(
    version=_VQA_VERSION, seed=seed, num_train=num_train, num_val=num_val, image_size=image_size
  )
  root = _ensure(
    cache_dir, "builtin-vqa", params, lambda tmp: _write_vqa(tmp, seed, counts, image_size)
  )
  (train_q, train_a), (val_q, val_a) = (vqa_file_names(s) for s in ("train", "val"))
  return BuiltinVqa(
    root=root,
    image_root=root,
    train_questions=os.path.join(root, train_q),
    train_annotations=os.path.join(root, train_a),
    val_questions=os.path.join(root, val_q),
    val_annotations=os.path.join(root, val_a),
  )


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
  root = _ensure(
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
