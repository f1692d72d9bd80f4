"""VQAv2 in its official format: the answer normalisation of the VQA evaluation script,
the questions reader, ViLT's answer vocabulary and the grain dataset of VQA batches.

Files: `v2_OpenEnded_mscoco_<subtype>_questions.json` ({"data_subtype", "questions":
[{"question_id", "image_id", "question"}]}), optionally `v2_mscoco_<subtype>_annotations
.json` ({"annotations": [{"question_id", "answers": [{"answer"}, ... 10],
"multiple_choice_answer", "answer_type", "question_type"}]}; test-dev has none), and COCO
images `COCO_<subtype>_<image_id:012d>.jpg` in `image_root` or `image_root/<subtype>`
(test-dev2015 questions are about the test2015 images).

The normalisation and the vocabulary live here, below evaluation/vqa.py which scores
with them (and re-exports them): training targets and the metric must normalise alike,
and the input pipeline may not import evaluation.

The answer vocabulary is ViLT's (which VLC reuses): every question's
`multiple_choice_answer`, normalised, counted once per question; answers counted at
least `min_count` (9) times are kept, in order of first occurrence. Over VQAv2's train +
val annotations that gives the 3,129 answers of ViLT/VLC. `count="annotators"` counts
every annotator's answer instead.

Batches (task_data.py's rows): {"image" uint8 (B, S, S, 3), "tokens" int32 (B, T),
"targets" float32 (B, num_answers) soft scores, "question_id" int64 (B,)}.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from vlp_jax.input_pipeline.task_data import (
  TaskDataError,
  TaskRows,
  check_images_exist,
  json_field,
  json_list,
  read_json,
  read_text,
  task_batches,
)
from vlp_jax.input_pipeline.tokenizers import Tokenizer

# ------------------------------------------------------------- VQA answer normalisation
# Written from the facts of the official script (vqaEval.py of the VQA API).

# processPunctuation's marks; "." is handled apart and "'" is kept (contractions need it).
VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The script's "(?!<=\d)(\.)(?!\d)" opens with a lookahead (not the lookbehind it looks
# like) that never fails in front of a ".": a period goes unless a digit follows it.
_PERIOD = re.compile(r"\.(?!\d)")
# The script passes re.UNICODE (32) where `sub` takes its count: at most 32 periods go.
_MAX_PERIODS = 32
NUMBER_WORDS = {
  "none": "0",
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The script's contraction table, as the contracted forms it restores. A form with one
# apostrophe is looked up without it ("dont"); a form with several, without any one of
# them ("couldnt've", "couldn'tve"), never without all. Capitalised keys ("Im") never
# match the lower-cased words; they are in the script's table, so they are here.
_ONE_APOSTROPHE = """
  ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd
  he's how'd how'll how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't
  must've needn't not've o'clock oughtn't shan't should've shouldn't somebody'll
  somebody's someone'd someone'll someone's something'd something'll that's there'd
  there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll
  what're what's what've when's where'd where's where've who'd who'll who's who've why'll
  why're why's won't would've wouldn't y'all you'd you'll you're you've
"""
_SEVERAL_APOSTROPHES = """
  couldn't've hadn't've he'd've I'd've it'd've mightn't've 'ow's'at she'd've
  shouldn't've somebody'd've someone'd've something'd've there'd've they'd've we'd've
  who'd've wouldn't've y'all'll y'all'd've you'd've
"""


def _contraction_table() -> dict[str, str]:
  # Three entries break the pattern (one maps backwards); the script has them.
  table = {"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"}
  for form in _ONE_APOSTROPHE.split():
    table[form.replace("'", "")] = form
  for form in _SEVERAL_APOSTROPHES.split():
    for i in [i for i, c in enumerate(form) if c == "'"]:
      table[form[:i] + form[i + 1 :]] = form
  return table


CONTRACTIONS = _contraction_table()  # 120 entries, as the script's


def process_punctuation(text: str) -> str:
  """The script's processPunctuation. A mark that touches a space anywhere in the text
  is deleted, any other becomes a space ("black/white" -> "black white"), and if the text
  has a comma between digits every mark is deleted ("1,000" -> "1000"). Then periods not
  followed by a digit are deleted ("3.5" keeps its point)."""
  comma_in_number = _COMMA_BETWEEN_DIGITS.search(text) is not None
  out = text
  for mark in VQA_PUNCTUATION:
    touches_space = f"{mark} " in text or f" {mark}" in text
    out = out.replace(mark, "" if touches_space or comma_in_number else " ")
  return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
  """The script's processDigitArticle: lower case, number words -> digits, articles
  dropped, contractions restored, words joined by single spaces."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


@functools.lru_cache(maxsize=1 << 18)  # VQAv2's 4.4M answers hold ~150k distinct strings.
def normalize_answer(text: str) -> str:
  """An answer as the script compares it when annotators disagree: tabs and newlines as
  spaces, trimmed, then `process_punctuation` and `process_digit_article`. Equal to
  ViLT's `normalize_word` (whose final comma removal finds no comma left)."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(text))


def soft_score(count: int) -> float:
  """ViLT's get_score: 0 / 0.3 / 0.6 / 0.9 / 1.0 for 0 / 1 / 2 / 3 / >= 4 annotators: the
  official accuracy of that answer among ten annotators."""
  return (0.0, 0.3, 0.6, 0.9, 1.0)[min(count, 4)]


def answer_scores(annotator_answers: Sequence[str], normalize: bool = True) -> dict[str, float]:
  """Soft score of every answer the annotators gave.

  Answers are normalised before counting, so "two" and "2" add up as the metric counts
  them; ViLT counts the raw strings (`normalize=False`), which differs only where raw
  answers are not in normal form.
  """
  counts = Counter(normalize_answer(a) if normalize else a for a in annotator_answers)
  return {answer: soft_score(count) for answer, count in counts.items()}


# ----------------------------------------------------------------------------- reader


@dataclasses.dataclass(frozen=True)
class VqaExample:
  """One VQAv2 question; the answer fields are empty without annotations (test-dev)."""

  question_id: int
  image_id: int
  image: str  # path of the image file
  question: str
  answers: tuple[str, ...] = ()  # the annotators' raw answers (10 in VQAv2)
  multiple_choice_answer: str = ""  # the most common answer
  answer_type: str = ""  # "yes/no", "number" or "other"
  question_type: str = ""  # the question's first words, e.g. "what color is the"

  @property
  def images(self) -> tuple[str, ...]:
    return (self.image,)


VQA_ANSWERS = 10  # Annotators per question in VQAv2, which the metric assumes.


def metric_cap(num_answers: int) -> float:
  """The best official accuracy a question with `num_answers` annotator answers can get:
  min(1, (n - 1) / 3), every leave-one-out subset of n - 1 answers agreeing."""
  return min(1.0, (num_answers - 1) / 3)


def _vqa_annotations(path: str) -> dict[int, dict]:
  by_question = {}
  for i, entry in enumerate(json_list(read_json(path), "annotations", path)):
    where = f"{path}: annotations[{i}]"
    question_id = json_field(entry, "question_id", where, int)
    where = f"{where} (question_id {question_id})"
    answers = json_field(entry, "answers", where, list)
    if not answers:
      raise TaskDataError(f"{where}: no answers")
    by_question[question_id] = {
      "answers": tuple(
        json_field(a, "answer", f"{where}: answers[{j}]", str) for j, a in enumerate(answers)
      ),
      "multiple_choice_answer": json_field(entry, "multiple_choice_answer", where, str),
      "answer_type": json_field(entry, "answer_type", where, str),
      "question_type": json_field(entry, "question_type", where, str),
    }
  few = [len(a["answers"]) for a in by_question.values() if len(a["answers"]) < VQA_ANSWERS]
  if few:
    logging.warning(
      "%s: %d of %d questions have fewer than %d annotator answers (as few as %d): the "
      "official metric caps their accuracy at %.1f%% (min(1, (answers - 1) / 3))",
      path,
      len(few),
      len(by_question),
      VQA_ANSWERS,
      min(few),
      100 * metric_cap(min(few)),
    )
  return by_question


def read_vqa(
  questions_json: str,
  annotations_json: str | None,
  image_root: str,
  image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg",
) -> list[VqaExample]:
  """VQAv2 questions (+ annotations) -> examples in the questions file's order.

  `image_pattern` names an image from the questions file's "data_subtype" ("train2014";
  test-dev2015 -> "test2015") and the image id. Images are looked for in
  `image_root/<subtype>` if that directory exists, else in `image_root`; a missing
  image is not an error here (the datasets skip it, naming the file).
  """
  data = read_json(questions_json)
  questions = json_list(data, "questions", questions_json)
  subtype = data.get("data_subtype") or ""
  if not isinstance(subtype, str) or ("{subtype}" in image_pattern and not subtype):
    raise TaskDataError(f"{questions_json}: no 'data_subtype' string (image_pattern needs it)")
  subtype = "test2015" if subtype == "test-dev2015" else subtype
  folder = os.path.join(image_root, subtype) if subtype else image_root
  if not os.path.isdir(folder):
    folder = image_root
  if not questions:
    raise TaskDataError(f"{questions_json}: the 'questions' list is empty")
  annotations = _vqa_annotations(annotations_json) if annotations_json else None
  examples = []
  for i, entry in enumerate(questions):
    where = f"{questions_json}: questions[{i}]"
    question_id = json_field(entry, "question_id", where, int)
    image_id = json_field(entry, "image_id", where, int)
    answer_fields = {}
    if annotations is not None:
      if question_id not in annotations:
        raise TaskDataError(f"{annotations_json}: no annotation of question_id {question_id}")
      answer_fields = annotations[question_id]
    examples.append(
      VqaExample(
        question_id=question_id,
        image_id=image_id,
        image=os.path.join(folder, image_pattern.format(subtype=subtype, image_id=image_id)),
        question=json_field(entry, "question", where, str),
        **answer_fields,
      )
    )
  check_images_exist([e.image for e in examples], questions_json, image_root)
  return examples


# ----------------------------------------------------------------------------- answer vocabulary


def build_answer_vocab(
  annotations: Iterable[VqaExample], min_count: int = 9, *, count: str = "multiple_choice"
) -> list[str]:
  """Normalised answers counted at least `min_count` times, in order of first
  occurrence. `count`: "multiple_choice" (ViLT/VLC: each question's most common answer,
  once) or "annotators" (every annotator answer)."""
  if count not in ("multiple_choice", "annotators"):
    raise ValueError(f"count={count!r} is not 'multiple_choice' or 'annotators'")
  counts: Counter[str] = Counter()
  for example in annotations:
    if not example.answers:
      raise ValueError(f"question {example.question_id} has no annotations")
    if count == "multiple_choice":
      counts[normalize_answer(example.multiple_choice_answer)] += 1
    else:
      counts.update(normalize_answer(a) for a in example.answers)
  return [answer for answer, n in counts.items() if n >= min_count]


def write_answer_vocab(path: str, answers: Sequence[str]) -> None:
  """One answer per line, written atomically."""
  bad = [a for a in answers if not a or "\n" in a or a != a.strip()]
  if bad:
    raise ValueError(f"answers cannot be written one per line: {bad[:5]}")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(f"{a}\n" for a in answers))
  os.replace(tmp, path)


def read_answer_vocab(path: str) -> list[str]:
  """An answer vocabulary file, each answer normalised as the annotations are (so "Red"
  and " yes" match the annotators' "red" and "yes"); an empty line, or one that repeats
  another once normalised ("Two" after "2"), is an error naming it."""
  lines = read_text(path).splitlines()
  seen: dict[str, int] = {}
  answers, changed = [], 0
  for number, line in enumerate(lines, 1):
    answer = normalize_answer(line)
    if not answer:
      raise TaskDataError(f"{path}:{number}: empty line")
    if answer in seen:
      raise TaskDataError(
        f"{path}:{number}: {line!r} repeats line {seen[answer]} (both are {answer!r} once "
        "normalised as VQA's metric does)"
      )
    seen[answer] = number
    answers.append(answer)
    changed += answer != line
  if not answers:
    raise TaskDataError(f"{path}: no answers")
  if changed:
    logging.warning(
      "%s: %d of %d answers normalised as the annotations are (e.g. %r -> %r)",
      path,
      changed,
      len(answers),
      *next((line, a) for line, a in zip(lines, answers) if line != a),
    )
  return answers


# ----------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class _VqaRows(TaskRows):
  num_answers: int = 0

  def paths(self, example: VqaExample) -> list[str]:
    return [example.image]

  def fields(self, example: VqaExample, target: tuple[np.ndarray, np.ndarray]) -> dict:
    dense = np.zeros(self.num_answers, np.float32)
    dense[target[0]] = target[1]
    return {
      "text": example.question,
      "targets": dense,
      "question_id": np.int64(example.question_id),
    }

  def padding(self) -> dict[str, Any]:
    return {
      "text": "",
      "targets": np.zeros(self.num_answers, np.float32),
      "question_id": np.int64(-1),
    }


def vqa_targets(
  examples: Sequence[VqaExample], answer_vocab: Sequence[str]
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per example, the vocabulary indices of its annotators' answers and their soft
  scores; answers outside the vocabulary have no target."""
  index = {answer: i for i, answer in enumerate(answer_vocab)}
  if len(index) != len(answer_vocab):
    raise ValueError("the answer vocabulary repeats an answer")
  targets = []
  for example in examples:
    scored = [(index[a], s) for a, s in answer_scores(example.answers).items() if a in index]
    ids = np.asarray([i for i, _ in scored], np.int32)
    targets.append((ids, np.asarray([s for _, s in scored], np.float32)))
  return targets


def create_vqa_dataset(
  examples: Sequence[VqaExample],
  tokenizer: Tokenizer,
  answer_vocab: Sequence[str],
  *,
  image_size: int,
  train: bool,
  crop_scale: tuple[float, float] | None = None,
  skip_list: str = "",
  **batching: Any,
) -> grain.IterDataset:
  """VQA batches for this process (fields: module docstring); `batching`: task_batches'
  batch_size, seed, num_workers, process_index, process_count and read_threads.

  Training leaves out the questions none of whose answers is in `answer_vocab`, as ViLT
  does; evaluation keeps every question (zero targets without annotations). A
  `crop_scale` adds random-resized crops to training; `skip_list` names the file where
  every image that cannot be read is listed.
  """
  elements = list(zip(examples, vqa_targets(examples, answer_vocab)))
  if train:
    kept = [e for e in elements if len(e[1][0])]
    if len(kept) < len(elements):
      logging.info(
        "VQA training: %d of %d questions have no answer in the vocabulary; left out",
        len(elements) - len(kept),
        len(elements),
      )
    elements = kept
  rows = _VqaRows(image_size, train, crop_scale, skip_list, num_answers=len(answer_vocab))
  return task_batches(elements, rows, tokenizer, **batching)
