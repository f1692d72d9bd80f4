"""VQAv2's official metric, answer vocabulary and result file.

The metric is the VQA API's evaluation script (vqaEval.py): an answer's accuracy is
min(#matching annotators / 3, 1) averaged over the ten leave-one-out subsets of nine
annotators; answers are compared after `normalize_answer` only when the annotators
disagree (as the script does: when all give the same string, the comparison is exact
after trimming); overall and per answer type and question type in percent, rounded to
two decimals. The normalisation and ViLT's answer vocabulary are in
input_pipeline/vqa_data.py, because the training targets and the fine-tuning head use
them too; they are re-exported here.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from vlp_jax.input_pipeline.vqa_data import (
  VqaExample,
  answer_scores,
  build_answer_vocab,
  normalize_answer,
  read_answer_vocab,
  soft_score,
  write_answer_vocab,
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
