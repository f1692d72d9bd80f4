"""VQAv2's official metric, answer vocabulary and result file.

The metric is the VQA API's evaluation script (vqaEval.py): an answer's accuracy is
min(#matching annotators / 3, 1) averaged over the ten leave-one-out subsets of nine
annotators; answers are compared after `normalize_answer` only when the annotators
disagree (as the script does: when all give the same string, the comparison is exact
after trimming); overall and per answer type and question type in percent, rounded to
two decimals. The normalisation itself is in input_pipeline/task_data.py, because the
training targets use it too; it is re-exported here.

The answer vocabulary is ViLT's (which VLC reuses): every question's
`multiple_choice_answer`, normalised, counted once per question; answers counted at
least `min_count` (9) times are kept, in order of first occurrence. Over VQAv2's train +
val annotations that gives the 3,129 answers of ViLT/VLC. `count="annotators"` counts
every annotator's answer instead.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from absl import logging

from vlp_jax.input_pipeline.task_data import (
  TaskDataError,
  VqaExample,
  answer_scores,
  normalize_answer,
  read_text,
  soft_score,
)

__all__ = [
  "answer_scores",
  "build_answer_vocab",
  "evaluate_vqa",
  "majority_baseline",
  "normalize_answer",
  "read_answer_vocab",
  "soft_score",
  "vqa_accuracy",
  "write_answer_vocab",
  "write_vqa_results",
]


def _trim(answer: str) -> str:
  return answer.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(predicted: str, annotator_answers: Sequence[str]) -> float:
  """The official accuracy of one predicted answer, in [0, 1]."""
  if not annotator_answers:
    raise ValueError("no annotator answers")
  answers = [_trim(a) for a in annotator_answers]
  predicted = _trim(predicted)
  if len(set(answers)) > 1:
    answers = [normalize_answer(a) for a in answers]
    predicted = normalize_answer(predicted)
  matches = sum(a == predicted for a in answers)
  # Leaving annotator i out: min(1, matches among the others / 3); the script's order of
  # operations, so results are bit-identical.
  per_subset = [min(1, (matches - (a == predicted)) / 3) for a in answers]
  return sum(per_subset) / len(per_subset)


def evaluate_vqa(
  predictions: Mapping[int, str],
  annotations: Sequence[VqaExample],
  *,
  question_ids: Iterable[int] | None = None,
  ndigits: int = 2,
) -> dict:
  """{"overall", "perAnswerType", "perQuestionType" (percent), "num_questions"}.

  As the script, every annotated question needs a prediction unless `question_ids`
  names the ones to score.
  """
  by_id = {example.question_id: example for example in annotations}
  ids = list(by_id) if question_ids is None else list(question_ids)
  if not ids:
    raise ValueError("no questions to evaluate")
  unknown = [q for q in ids if q not in by_id]
  if unknown:
    raise ValueError(f"{len(unknown)} question ids have no annotation, e.g. {unknown[:5]}")
  missing = [q for q in ids if q not in predictions]
  if missing:
    raise ValueError(
      f"{len(missing)} of {len(ids)} questions have no prediction, e.g. {missing[:5]}"
    )
  overall = []
  by_answer_type, by_question_type = defaultdict(list), defaultdict(list)
  for question_id in ids:
    example = by_id[question_id]
    if not example.answers:
      raise ValueError(f"question {question_id} has no annotator answers")
    accuracy = vqa_accuracy(predictions[question_id], example.answers)
    overall.append(accuracy)
    by_answer_type[example.answer_type].append(accuracy)
    by_question_type[example.question_type].append(accuracy)

  def percent(values: list[float]) -> float:
    return round(100 * sum(values) / len(values), ndigits)

  return {
    "overall": percent(overall),
    "perAnswerType": {k: percent(v) for k, v in by_answer_type.items()},
    "perQuestionType": {k: percent(v) for k, v in by_question_type.items()},
    "num_questions": len(ids),
  }


def write_vqa_results(path: str, predictions: Mapping[int, str]) -> None:
  """The test-dev submission file: [{"question_id": int, "answer": str}, ...]."""
  results = [{"question_id": int(q), "answer": str(a)} for q, a in predictions.items()]
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(results, f)
  os.replace(tmp, path)  # Never a half-written submission.


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


def majority_baseline(
  train: Sequence[VqaExample], val: Sequence[VqaExample], *, by: str = "all"
) -> float:
  """Overall accuracy on `val` of answering every question with the most common training
  answer (`by="all"`), or with the most common one of its question type
  ("question_type", falling back to the overall one): what a model that ignores the
  image (or the question) scores."""
  if by not in ("all", "question_type"):
    raise ValueError(f"by={by!r} is not 'all' or 'question_type'")
  overall = Counter(normalize_answer(e.multiple_choice_answer) for e in train)
  if not overall:
    raise ValueError("no training questions")
  per_type: dict[str, Counter[str]] = defaultdict(Counter)
  for e in train:
    per_type[e.question_type][normalize_answer(e.multiple_choice_answer)] += 1
  default = overall.most_common(1)[0][0]
  predictions = {}
  for e in val:
    counts = per_type.get(e.question_type) if by == "question_type" else None
    predictions[e.question_id] = counts.most_common(1)[0][0] if counts else default
  return evaluate_vqa(predictions, val)["overall"]
