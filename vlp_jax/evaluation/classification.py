"""Zero-shot classification with CLIP_benchmark's definitions.

A class vector is the mean of the class's normalised prompt embeddings, normalised
again; logits = 100 * cosine(image, class). acc@k: the label is among the k highest
logits (ties go to the lower class index; CLIP_benchmark's torch.topk order is arbitrary
among equal logits); acc@5 is NaN for fewer than 5 classes. Mean per-class recall is
scikit-learn's balanced accuracy of the argmax prediction: recall averaged over the
classes that occur in the labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LOGIT_SCALE = 100.0


def fill_template(template: str, classname: str) -> str:
  """CLIP_benchmark's templates say "{c}"; OpenAI's notebook style "{}" works too."""
  if "{c}" in template:
    return template.replace("{c}", classname)
  return template.replace("{}", classname)


def prompts(
  classnames: Sequence[str], templates: Sequence[str] | dict[str, Sequence[str]]
) -> tuple[list[str], np.ndarray]:
  """(texts, class index of each text): every template filled with every class name, or
  class-specific prompts (CuPL style) when `templates` maps class names to prompts."""
  texts, owner = [], []
  for c, name in enumerate(classnames):
    if isinstance(templates, dict):
      if name not in templates:
        raise KeyError(f"no prompts for class {name!r}")
      class_texts = list(templates[name])
    else:
      class_texts = [fill_template(t, name) for t in templates]
    texts.extend(class_texts)
    owner.extend([c] * len(class_texts))
  return texts, np.asarray(owner, np.int64)


def zeroshot_classifier(text_emb: np.ndarray, owner: np.ndarray, num_classes: int) -> np.ndarray:
  """(num_classes, D): mean of each class's normalised prompt embeddings, renormalised."""
  text_emb = text_emb / np.linalg.norm(text_emb, axis=-1, keepdims=True)
  sums = np.zeros((num_classes, text_emb.shape[1]), np.float64)
  np.add.at(sums, owner, text_emb)
  means = sums / np.maximum(np.bincount(owner, minlength=num_classes), 1)[:, None]
  return (means / np.linalg.norm(means, axis=-1, keepdims=True)).astype(np.float32)


def zeroshot_logits(image_emb: np.ndarray, classifier: np.ndarray) -> np.ndarray:
  image_emb = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
  return LOGIT_SCALE * image_emb @ classifier.T


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Share of rows whose label is among the k highest logits (ties: lower index first)."""
  labels = np.asarray(labels)
  target = logits[np.arange(len(labels)), labels][:, None]
  earlier = np.arange(logits.shape[1])[None, :] < labels[:, None]
  position = (logits > target).sum(axis=1) + ((logits == target) & earlier).sum(axis=1)
  return float((position < k).mean())


def mean_per_class_recall(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Balanced accuracy: recall averaged over the classes present in `labels`."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  present = np.unique(labels)
  recalls = [np.mean(predictions[labels == c] == c) for c in present]
  return float(np.mean(recalls))


def classification_metrics(
  logits: np.ndarray, labels: np.ndarray, num_classes: int, prefix: str = ""
) -> dict[str, float]:
  """acc1, acc5 (NaN under 5 classes) and mean_per_class_recall, CLIP_benchmark's keys."""
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels, np.int64)
  if len(labels) == 0:
    raise ValueError("no examples to classify")
  acc5 = topk_accuracy(logits, labels, 5) if num_classes >= 5 else float("nan")
  return {
    f"{prefix}acc1": topk_accuracy(logits, labels, 1),
    f"{prefix}acc5": acc5,
    f"{prefix}mean_per_class_recall": mean_per_class_recall(labels, logits.argmax(axis=1)),
  }
