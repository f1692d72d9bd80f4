"""The built-in VQA set (builtin_tasks.py), in VQAv2's layout.

VQA, in VQAv2's layout: QUESTIONS_PER_IMAGE questions of different kinds per image:
"what colour is the circle?" (asked only when there is one circle), "what shape is the
red object?" (one red object), "how many shapes are there?", "how many squares are
there?" (0 too), "is the square left of the triangle?" (builtin.relation_holds: the
dominant axis decides; true half the time), "is there a red circle?" (half the time).
Ten simulated annotators answer each: one answers wrongly with WRONG_ANSWER_PROB (a
plausible other answer), and any answer is spelled differently with RESPELL_PROB
("two", "the red", "Yes", "circle.") in a way the official normalisation undoes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from vlp_jax.input_pipeline import builtin, vqa_data
from vlp_jax.input_pipeline.builtin import COLOUR_NAMES, RELATIONS, SHAPES, Scene
from vlp_jax.input_pipeline.builtin_tasks import SPLIT_SEEDS, ensure_cached, others, pick, plural

_VQA_VERSION = 1
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


@dataclasses.dataclass(frozen=True)
class VqaQuestion:
  question: str
  answer: str  # canonical: what normalize_answer makes of every spelling
  answer_type: str  # VQAv2's: "yes/no", "number", "other"
  question_type: str  # VQAv2-style: the question's opening words
  wrong: tuple[str, ...]  # what a mistaken annotator answers


def _unique(scene: Scene, attribute: str) -> list[Any]:
  """The objects of `scene` whose `attribute` ("shape", "colour") no other one shares,
  so that it names them."""
  counts = Counter(getattr(o, attribute) for o in scene.objects)
  return [o for o in scene.objects if counts[getattr(o, attribute)] == 1]


# The asked attribute -> the attribute naming the object, the question, its type and the
# values a mistaken annotator answers from.
_ATTRIBUTE_QUESTIONS = {
  "colour": ("shape", "what colour is the {shape}?", "what colour is the", COLOUR_NAMES),
  "shape": ("colour", "what shape is the {colour} object?", "what shape is the", SHAPES),
}


def _attribute_question(asked: str, scene: Scene, rng: np.random.Generator) -> VqaQuestion | None:
  """Asks the colour of an object named by its shape, or the shape of one named by its
  colour ("what colour is the circle?" when there is one circle)."""
  named_by, question, question_type, values = _ATTRIBUTE_QUESTIONS[asked]
  candidates = _unique(scene, named_by)
  if not candidates:
    return None
  obj = pick(rng, candidates)
  answer = getattr(obj, asked)
  text = question.format(shape=obj.shape, colour=obj.colour)
  return VqaQuestion(text, answer, "other", question_type, others(values, answer))


def _count_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion:
  answer = str(len(scene.objects))
  wrong = others(range(MAX_COUNT + 1), answer)
  return VqaQuestion("how many shapes are there?", answer, "number", "how many", wrong)


def _count_shape_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion:
  # Half the time a shape in the scene, else any shape (the answer may be 0).
  present = [o.shape for o in scene.objects]
  shape = pick(rng, present) if rng.uniform() < 0.5 else pick(rng, SHAPES)
  answer = str(present.count(shape))
  wrong = others(range(MAX_COUNT + 1), answer)
  return VqaQuestion(f"how many {plural(shape)} are there?", answer, "number", "how many", wrong)


def _relation_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion | None:
  unique = _unique(scene, "shape")
  if len(unique) < 2:
    return None
  i, j = rng.choice(len(unique), size=2, replace=False)
  a, b = unique[i], unique[j]
  holding = [r for r in RELATIONS if builtin.relation_holds(r, a, b)]
  failing = [r for r in RELATIONS if r not in holding]
  want = bool(holding) and (not failing or rng.uniform() < 0.5)
  relation = pick(rng, holding if want else failing)
  answer = "yes" if want else "no"
  return VqaQuestion(
    f"is the {a.shape} {relation} the {b.shape}?",
    answer,
    "yes/no",
    "is the",
    others(("yes", "no"), answer),
  )


def _exists_question(scene: Scene, rng: np.random.Generator) -> VqaQuestion:
  present = {(o.colour, o.shape) for o in scene.objects}
  if rng.uniform() < 0.5:
    colour, shape = pick(rng, sorted(present))
  else:
    absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
    colour, shape = pick(rng, absent)
  answer = "yes" if (colour, shape) in present else "no"
  return VqaQuestion(
    f"is there a {colour} {shape}?", answer, "yes/no", "is there a", others(("yes", "no"), answer)
  )


_QUESTION_KINDS: tuple[Callable[[Scene, np.random.Generator], VqaQuestion | None], ...] = (
  functools.partial(_attribute_question, "colour"),
  functools.partial(_attribute_question, "shape"),
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
      answer = pick(rng, question.wrong)
    canonical.append(answer)
    if rng.uniform() < RESPELL_PROB:
      answer = pick(rng, spellings(answer, question.answer_type))
    written.append(answer)
  return written, Counter(canonical).most_common(1)[0][0]


def generate_vqa_image(seed: int, split: str, index: int, image_size: int) -> dict:
  """One image of a split and its questions, fully determined by (seed, split, index)."""
  rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
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

  def examples(self, split: str) -> list[vqa_data.VqaExample]:
    """read_vqa of split "train" or "val"."""
    if split not in VQA_SPLITS:
      raise ValueError(f"split {split!r} is not one of {list(VQA_SPLITS)}")
    questions, annotations = self.train_questions, self.train_annotations
    if split == "val":
      questions, annotations = self.val_questions, self.val_annotations
    return vqa_data.read_vqa(questions, annotations, self.image_root)


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
  root = ensure_cached(
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
