"""NLVR2's metrics, as its evaluation script (nlvr2/eval/metrics.py) computes them.

Accuracy ("precision" in the script): the share of examples predicted correctly.
Consistency: the share of unique sentences all of whose examples are predicted
correctly. The script finds a sentence's examples by blanking the pair id of the
identifier `split-set-pair-sentence`: one sentence, written for an image set, is paired
with several image pairs of that set. Both in percent; every example needs a prediction.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from vlp_jax.input_pipeline.nlvr2_data import Nlvr2Example


def sentence_key(identifier: str) -> str:
  """The identifier without its pair id ("dev-850-2-0" -> "dev-850--0"), as the script."""
  parts = identifier.split("-")
  if len(parts) < 3:
    raise ValueError(f"identifier {identifier!r} is not split-set-pair-sentence")
  parts[2] = ""
  return "-".join(parts)


def _as_bool(prediction: bool | int | str) -> bool:
  if isinstance(prediction, str):
    if prediction.lower() not in ("true", "false"):
      raise ValueError(f"prediction {prediction!r} is not 'True' or 'False'")
    return prediction.lower() == "true"
  return bool(prediction)


def evaluate_nlvr2(
  predictions: Mapping[str, bool | int | str], examples: Sequence[Nlvr2Example]
) -> dict:
  """{"accuracy", "consistency" (percent), "num_examples", "num_sentences"} from
  predictions keyed by identifier (True / 1 / "True": the statement holds)."""
  if not examples:
    raise ValueError("no examples to evaluate")
  missing = [e.identifier for e in examples if e.identifier not in predictions]
  if missing:
    raise ValueError(
      f"{len(missing)} of {len(examples)} examples have no prediction, e.g. {missing[:5]}"
    )
  correct = 0
  consistent: dict[str, bool] = {}
  for example in examples:
    right = _as_bool(predictions[example.identifier]) == example.label
    correct += right
    key = sentence_key(example.identifier)
    consistent[key] = consistent.get(key, True) and right
  return {
    "accuracy": 100 * correct / len(examples),
    "consistency": 100 * sum(consistent.values()) / len(consistent),
    "num_examples": len(examples),
    "num_sentences": len(consistent),
  }


def accuracy_by_group(
  predictions: Mapping[str, bool | int | str],
  examples: Sequence[Nlvr2Example],
  group_of: Callable[[Nlvr2Example], str],
) -> dict[str, float]:
  """Accuracy (percent) of each group of examples (e.g. the built-in set's statement
  kinds); examples whose group is "" are left out."""
  right: dict[str, list[bool]] = {}
  for example in examples:
    if group := group_of(example):
      hit = _as_bool(predictions[example.identifier]) == example.label
      right.setdefault(group, []).append(hit)
  return {group: 100 * sum(hits) / len(hits) for group, hits in sorted(right.items())}


def write_nlvr2_predictions(path: str, predictions: Mapping[str, bool | int | str]) -> None:
  """The evaluation script's input: "identifier,True|False" lines, written atomically."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for identifier, prediction in predictions.items():
      f.write(f"{identifier},{_as_bool(prediction)}\n")
  os.replace(tmp, path)


def majority_baseline(train: Sequence[Nlvr2Example], dev: Sequence[Nlvr2Example]) -> float:
  """Accuracy (percent) on `dev` of always predicting the most common training label."""
  if not train or not dev:
    raise ValueError("majority_baseline needs training and evaluation examples")
  majority = Counter(e.label for e in train).most_common(1)[0][0]
  return 100 * sum(e.label == majority for e in dev) / len(dev)
