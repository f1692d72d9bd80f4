"""Readers and grain datasets for two fine-tuning tasks, VQAv2 and NLVR2, in their
official formats.

VQAv2: `v2_OpenEnded_mscoco_<subtype>_questions.json` ({"data_subtype", "questions":
[{"question_id", "image_id", "question"}]}), optionally `v2_mscoco_<subtype>_annotations
.json` ({"annotations": [{"question_id", "answers": [{"answer"}, ... 10],
"multiple_choice_answer", "answer_type", "question_type"}]}; test-dev has none), and COCO
images `COCO_<subtype>_<image_id:012d>.jpg` in `image_root` or `image_root/<subtype>`
(test-dev2015 questions are about the test2015 images).

NLVR2: jsonl files (`train.json`, `dev.json`, `test1.json`: one {"identifier",
"sentence", "label": "True" | "False", "directory"?} per line). Identifier
`split-set-pair-sentence` has the images `split-set-pair-img0.png` (left) and `-img1.png`
(right), looked up in `image_root/<directory>` (the official train layout), `image_root`,
or anywhere below `image_root` by file name (or by stem, for re-encoded copies).

The VQA evaluation script's answer normalisation lives here, below evaluation/vqa.py
which scores with it: training targets and the metric must normalise alike, and the
input pipeline may not import evaluation.

Batches hold uint8 pixels of the whole image resized to S x S (a crop could cut away what
a question or statement is about; no flips, which swap left and right):
- VQA: {"image" (B, S, S, 3), "tokens" int32 (B, T), "targets" float32 (B, num_answers)
  soft scores, "question_id" int64 (B,)};
- NLVR2: {"image", "image2" (B, S, S, 3), "tokens", "label" int32 (B,) (1: true),
  "index" int64 (B,): the row's position in `examples`, which names its identifier}.
Training batches add "skipped" int32 (unreadable images dropped just before the row, as
in pipeline.py) and are shuffled, endless and seeded. Evaluation batches are one ordered
pass over this process's share, padded to the same number of batches on every process,
with "valid" bool (B,): False for padding (question_id / index -1) and for rows whose
image could not be read (they keep their id; the warning names the file).

Malformed files raise `TaskDataError` naming the file and the line or key.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import grain
import numpy as np
from absl import flags, logging

from vlp_jax import processes
from vlp_jax.config_lib import UserError
from vlp_jax.input_pipeline import image_files, pipeline
from vlp_jax.input_pipeline.tokenizers import Tokenizer


class TaskDataError(UserError, ValueError):
  """A task's file is missing or malformed; the message names the file and line/key."""


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


# ----------------------------------------------------------------------------- readers


def read_text(path: str) -> str:
  """A UTF-8 text file; TaskDataError naming the file, and the line and byte of the
  first byte that is not UTF-8."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise TaskDataError(f"{path} does not exist") from e
  except IsADirectoryError as e:
    raise TaskDataError(f"{path} is a directory, not a file") from e
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise TaskDataError(
      f"{path}:{line}: byte {data[e.start : e.start + 1]!r} at column {column} (offset "
      f"{e.start}) is not UTF-8 ({e.reason}); the file must be UTF-8 text"
    ) from e


def _read_json(path: str) -> Any:
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def _field(entry: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
  if not isinstance(entry, dict) or key not in entry:
    raise TaskDataError(f"{where}: missing {key!r}")
  value = entry[key]
  if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
    raise TaskDataError(f"{where}: {key!r} is {value!r}, of the wrong type")
  return value


def _list_field(data: Any, key: str, path: str) -> list:
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise TaskDataError(f"{path}: no {key!r} list at the top level")
  return data[key]


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


VQA_ANSWERS = 10  # Annotators per question in VQAv2, which the metric assumes.


def metric_cap(num_answers: int) -> float:
  """The best official accuracy a question with `num_answers` annotator answers can get:
  min(1, (n - 1) / 3), every leave-one-out subset of n - 1 answers agreeing."""
  return min(1.0, (num_answers - 1) / 3)


def _vqa_annotations(path: str) -> dict[int, dict]:
  by_question = {}
  for i, entry in enumerate(_list_field(_read_json(path), "annotations", path)):
    where = f"{path}: annotations[{i}]"
    question_id = _field(entry, "question_id", where, int)
    where = f"{where} (question_id {question_id})"
    answers = _field(entry, "answers", where, list)
    if not answers:
      raise TaskDataError(f"{where}: no answers")
    by_question[question_id] = {
      "answers": tuple(
        _field(a, "answer", f"{where}: answers[{j}]", str) for j, a in enumerate(answers)
      ),
      "multiple_choice_answer": _field(entry, "multiple_choice_answer", where, str),
      "answer_type": _field(entry, "answer_type", where, str),
      "question_type": _field(entry, "question_type", where, str),
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
  data = _read_json(questions_json)
  questions = _list_field(data, "questions", questions_json)
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
    question_id = _field(entry, "question_id", where, int)
    image_id = _field(entry, "image_id", where, int)
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
        question=_field(entry, "question", where, str),
        **answer_fields,
      )
    )
  _check_images_exist([e.image for e in examples], questions_json, image_root)
  return examples


def _check_images_exist(paths: Sequence[str], source: str, image_root: str) -> None:
  """TaskDataError when none of `paths` exists (a wrong images= directory), a warning
  when some are missing (the datasets skip their rows)."""
  distinct = list(dict.fromkeys(paths))
  missing = [p for p in distinct if not os.path.lexists(p)]
  if len(missing) == len(distinct):
    raise TaskDataError(
      f"{source}: none of the {len(distinct)} images it names exist under images="
      f"{image_root} (the first: {missing[0]}); is images= the right directory?"
    )
  if missing:
    logging.warning(
      "%d of %d images of %s are not under %s (first: %s); their rows will be skipped",
      len(missing),
      len(distinct),
      source,
      image_root,
      missing[0],
    )


@dataclasses.dataclass(frozen=True)
class Nlvr2Example:
  """One NLVR2 statement about an image pair."""

  identifier: str  # split-set-pair-sentence
  sentence: str
  label: bool
  left: str  # image paths
  right: str


class _ImageFinder:
  """Finds an image by name in the expected folders, else anywhere below the root (by
  name, then by stem); the recursive index is built once, on the first miss."""

  def __init__(self, root: str):
    self._root = root
    self._index: dict[str, str] | None = None

  def _build_index(self) -> dict[str, str]:
    index: dict[str, str] = {}
    for folder, _, names in sorted(os.walk(self._root)):
      for name in sorted(names):
        path = os.path.join(folder, name)
        index.setdefault(name, path)
        index.setdefault(os.path.splitext(name)[0], path)
    return index

  def find(self, name: str, folders: Sequence[str]) -> str | None:
    for folder in folders:
      path = os.path.join(self._root, folder, name)
      if os.path.isfile(path):
        return path
    if self._index is None:
      self._index = self._build_index()
    return self._index.get(name) or self._index.get(os.path.splitext(name)[0])


def read_nlvr2(jsonl: str, image_root: str) -> list[Nlvr2Example]:
  """An NLVR2 jsonl file -> examples in file order. An image found nowhere keeps its
  expected path (the datasets skip the row, naming the file) and is counted here."""
  lines = read_text(jsonl).splitlines()
  finder = _ImageFinder(image_root)
  examples, missing = [], []
  first_line: dict[str, int] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{jsonl}:{number}"
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskDataError(f"{where}: not valid JSON ({e.msg})") from e
    identifier = _field(entry, "identifier", where, str)
    if identifier in first_line:
      raise TaskDataError(
        f"{where}: identifier {identifier!r} repeats line {first_line[identifier]} "
        "(consistency groups and predictions go by identifier)"
      )
    first_line[identifier] = number
    stem, sep, _ = identifier.rpartition("-")
    if not sep:
      raise TaskDataError(f"{where}: identifier {identifier!r} is not split-set-pair-sentence")
    label = str(_field(entry, "label", where, str | bool)).lower()
    if label not in ("true", "false"):
      raise TaskDataError(f"{where}: label {entry['label']!r} is not 'True' or 'False'")
    folders = [str(entry["directory"]), ""] if "directory" in entry else [""]
    paths = []
    for side in ("img0", "img1"):
      name = f"{stem}-{side}.png"
      path = finder.find(name, folders)
      if path is None:
        missing.append(name)
        path = os.path.join(image_root, folders[0], name)
      paths.append(path)
    examples.append(
      Nlvr2Example(identifier, _field(entry, "sentence", where, str), label == "true", *paths)
    )
  if not examples:
    raise TaskDataError(f"{jsonl}: no examples (the file is empty)")
  if len(missing) == 2 * len(examples):
    raise TaskDataError(
      f"{jsonl}: none of the {len(missing)} images it names exist under images={image_root} "
      f"(the first: {missing[0]}); is images= the right directory?"
    )
  if missing:
    logging.warning(
      "%d of %d images of %s are not under %s (first: %s); their rows will be skipped",
      len(missing),
      2 * len(examples),
      jsonl,
      image_root,
      missing[0],
    )
  return examples


# ----------------------------------------------------------------------------- datasets


def load_image(
  path: str,
  image_size: int,
  rng: np.random.Generator | None = None,
  crop_scale: tuple[float, float] | None = None,
) -> np.ndarray:
  """An image file -> uint8 (S, S, 3): the whole image, or a random-resized crop when
  `crop_scale` is given, resized as the training pipeline does (shrunk while decoding,
  then OpenCV). Raises OSError (image_files.ImageFileError: missing, not a regular file,
  too large) or pipeline.ImageError (corrupt) naming the file."""
  data = image_files.read_image_file(path)
  width, height = pipeline.image_dimensions(data)
  box = (0, 0, width, height)
  if crop_scale is not None and rng is not None:
    box = pipeline.random_resized_crop_box(width, height, rng, crop_scale)
  pixels = pipeline.decode_pixels(data, min(box[2] - box[0], box[3] - box[1]) / image_size)
  scale = pixels.shape[1] / width  # The decoder may have shrunk the image.
  return pipeline.crop_resize_pixels(pixels, tuple(v * scale for v in box), image_size)


def check_image(path: str) -> None:
  """Raises ImageFileError or pipeline.ImageError when `path` is not an image by a cheap
  look: image_files' checks and a header that parses (a corrupt body shows only when the
  image is decoded)."""
  size = 1 << 14  # Holds a JPEG's tables up to its scan but for large EXIF / ICC blocks.
  header = image_files.read_image_header(path, size)
  try:
    pipeline.image_dimensions(header)
  except pipeline.ImageError:
    if len(header) < size:
      raise  # The whole file was read.
    pipeline.image_dimensions(image_files.read_image_file(path))  # A header past 16 KiB.


def _problem(path: str, check: Callable[[str], Any] = check_image) -> str:
  try:
    check(path)
  except (OSError, pipeline.ImageError) as e:
    return str(e).replace("\n", " ")
  return ""


def screen_images(
  paths: Sequence[str], read_threads: int = 4, check: Callable[[str], Any] = check_image
) -> dict[str, str]:
  """{path: why} of the distinct `paths` that fail `check`, in first-use order."""
  distinct = list(dict.fromkeys(paths))
  with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool:
    problems = list(pool.map(functools.partial(_problem, check=check), distinct))
  return {path: why for path, why in zip(distinct, problems) if why}


def example_images(example: VqaExample | Nlvr2Example) -> tuple[str, ...]:
  if isinstance(example, Nlvr2Example):
    return example.left, example.right
  return (example.image,)


def write_skip_list(path: str, problems: dict[str, str]) -> None:
  """Adds `problems` to the image_files.SKIP_LIST_FILE lines of `path`: a resumed run
  keeps the files found unreadable before (while training, too) listed."""
  listed: dict[str, str] = {}
  with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
    listed = dict(line.rstrip("\n").partition("\t")[::2] for line in f if line.strip())
  listed.update(problems)
  with open(f"{path}.tmp", "w", encoding="utf-8") as f:
    f.writelines(f"{p}\t{why}\n" for p, why in listed.items())
  os.replace(f"{path}.tmp", path)


def drop_unreadable(
  examples: Sequence[Any],
  *,
  source: str,
  max_skipped_fraction: float,
  skip_list: str = "",
  read_threads: int = 4,
  images_of: Callable[[Any], Sequence[str]] = example_images,
  check: Callable[[str], Any] = check_image,
) -> list[Any]:
  """The training examples (VQA or NLVR2; others with `images_of`) whose images pass
  `check` (default `check_image`): a first pass over the task data, so that unreadable
  files stop a run before it trains, not after.

  Every unreadable file goes to `skip_list` (when given), all of them; a TaskDataError
  when more than `max_skipped_fraction` (config.data.max_skipped_fraction) of the
  examples would be left out, else a warning and the rest.
  """
  problems = screen_images([p for e in examples for p in images_of(e)], read_threads, check)
  if skip_list:
    write_skip_list(skip_list, problems)
  if not problems:
    return list(examples)
  kept = [e for e in examples if not any(p in problems for p in images_of(e))]
  left_out = len(examples) - len(kept)
  listed = f"all listed in {skip_list}" if skip_list else "not listed (no skip list)"
  first, why = next(iter(problems.items()))
  summary = (
    f"{left_out} of {len(examples)} training examples of {source} have an unreadable "
    f"image: {len(problems)} files, {listed}; the first: {first} ({why})"
  )
  if left_out > max_skipped_fraction * len(examples):
    raise TaskDataError(
      f"{summary}. That is {left_out / len(examples):.1%} > "
      f"config.data.max_skipped_fraction={max_skipped_fraction}: fix or remove them (or raise "
      "the fraction) before training"
    )
  logging.warning("%s; they are left out.", summary)
  return kept


# (skip list, path) pairs this process has listed already: each file is listed once.
_LISTED: set[tuple[str, str]] = set()
_LISTED_LOCK = threading.Lock()


def list_skip(skip_list: str, path: str, why: str) -> None:
  """Adds "<path>\t<why>" to `skip_list` unless this process listed `path` there."""
  with _LISTED_LOCK:
    if (skip_list, path) in _LISTED:
      return
    _LISTED.add((skip_list, path))
  # Appends of one short line: whole even from several reader threads and processes.
  with open(skip_list, "a", encoding="utf-8") as f:
    f.write(f"{path}\t{why}\n")


def _load_images(
  paths: Sequence[str],
  image_size: int,
  rng: np.random.Generator,
  crop_scale: tuple[float, float] | None,
  skip_list: str = "",
) -> list[np.ndarray] | None:
  images = []
  for path in paths:
    try:
      images.append(load_image(path, image_size, rng, crop_scale))
    except (OSError, pipeline.ImageError) as e:
      if skip_list:
        list_skip(skip_list, path, str(e).replace("\n", " "))
      where = f" (every such file is listed in {skip_list})" if skip_list else ""
      logging.log_every_n_seconds(logging.WARNING, "Skipping image %s: %s%s", 10, path, e, where)
      return None
  return images


@dataclasses.dataclass
class _TaskRows(grain.transforms.RandomMap):
  """(example, extra) -> row; an unreadable image gives None in training (dropped and
  counted by CountSkipped) and an invalid row in evaluation. Example None: padding."""

  image_size: int
  train: bool
  crop_scale: tuple[float, float] | None
  skip_list: str = ""  # Where an unreadable file is listed (image_files.SKIP_LIST_FILE).

  image_fields: ClassVar[tuple[str, ...]] = ("image",)

  @abc.abstractmethod
  def paths(self, example: Any) -> list[str]:
    """The image files of `example`, in `image_fields` order."""

  @abc.abstractmethod
  def fields(self, example: Any, extra: Any) -> dict[str, Any]:
    """The row's non-image fields."""

  @abc.abstractmethod
  def padding(self) -> dict[str, Any]:
    """The non-image fields of a padding row (no example)."""

  def random_map(self, element: tuple[Any, Any], rng: np.random.Generator) -> dict | None:
    example, extra = element
    if example is None:
      return self._without_images(self.padding())
    crop_scale = self.crop_scale if self.train else None
    images = _load_images(self.paths(example), self.image_size, rng, crop_scale, self.skip_list)
    row = self.fields(example, extra)
    if images is None:
      return None if self.train else self._without_images(row)
    row.update(zip(self.image_fields, images))
    if self.train:
      row["skipped"] = np.int32(0)
    else:
      row["valid"] = np.bool_(True)
    return row

  def _without_images(self, row: dict[str, Any]) -> dict[str, Any]:
    blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    return {**row, **dict.fromkeys(self.image_fields, blank), "valid": np.bool_(False)}


@dataclasses.dataclass
class _VqaRows(_TaskRows):
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


@dataclasses.dataclass
class _Nlvr2Rows(_TaskRows):
  image_fields: ClassVar[tuple[str, ...]] = ("image", "image2")

  def paths(self, example: Nlvr2Example) -> list[str]:
    return [example.left, example.right]

  def fields(self, example: Nlvr2Example, index: int) -> dict[str, Any]:
    return {"text": example.sentence, "label": np.int32(example.label), "index": np.int64(index)}

  def padding(self) -> dict[str, Any]:
    return {"text": "", "label": np.int32(-1), "index": np.int64(-1)}


def _batches(
  elements: list[tuple[Any, Any]],
  rows: _TaskRows,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seed: int,
  num_workers: int,
  process_index: int,
  process_count: int,
  read_threads: int,
) -> grain.IterDataset:
  if rows.train:
    if len(elements) < batch_size * process_count:
      raise ValueError(
        f"{len(elements)} training examples, fewer than a global batch of "
        f"{batch_size * process_count}"
      )
    # As pipeline.py: repeat() reshuffles every epoch and rows are drawn by global
    # position, so the global batches are the same on any number of processes.
    dataset = grain.MapDataset.source(elements).shuffle(seed=seed).repeat()
    dataset = dataset.random_map(rows, seed=seed)
    dataset = pipeline.ProcessRows(dataset, batch_size, process_index, process_count)
  else:
    # A strided share per process, padded so that every process runs as many batches.
    share = elements[process_index::process_count]
    num_batches = math.ceil(math.ceil(len(elements) / process_count) / batch_size)
    share += [(None, None)] * (num_batches * batch_size - len(share))
    dataset = grain.MapDataset.source(share).random_map(rows, seed=seed)
  read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size)
  iterable = dataset.to_iter_dataset(read_options, allow_nones=rows.train)
  if rows.train:
    iterable = pipeline.CountSkipped(iterable)
  iterable = iterable.batch(batch_size, drop_remainder=True)
  iterable = iterable.map(pipeline.TokenizeBatch(tokenizer))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags.
    iterable = iterable.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers),
      worker_init_fn=processes.exit_with_parent,
    )
  return iterable


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
  batch_size: int,
  seed: int,
  train: bool,
  num_workers: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  crop_scale: tuple[float, float] | None = None,
  read_threads: int = 4,
  skip_list: str = "",
) -> grain.IterDataset:
  """VQA batches of `batch_size` rows for this process (fields: module docstring).

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
  return _batches(
    elements,
    rows,
    tokenizer,
    batch_size=batch_size,
    seed=seed,
    num_workers=num_workers,
    process_index=process_index,
    process_count=process_count,
    read_threads=read_threads,
  )


def create_nlvr2_dataset(
  examples: Sequence[Nlvr2Example],
  tokenizer: Tokenizer,
  *,
  image_size: int,
  batch_size: int,
  seed: int,
  train: bool,
  num_workers: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  crop_scale: tuple[float, float] | None = None,
  read_threads: int = 4,
  skip_list: str = "",
) -> grain.IterDataset:
  """NLVR2 batches of `batch_size` rows for this process (fields: module docstring);
  "image" is the left image, "image2" the right one; `skip_list` as for VQA."""
  return _batches(
    [(example, i) for i, example in enumerate(examples)],
    _Nlvr2Rows(image_size, train, crop_scale, skip_list),
    tokenizer,
    batch_size=batch_size,
    seed=seed,
    num_workers=num_workers,
    process_index=process_index,
    process_count=process_count,
    read_threads=read_threads,
  )
