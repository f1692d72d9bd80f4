"""Compositional benchmarks: each item scores a few images against a few captions.

A `MatchingSet` holds unique images and texts (embedded once each) and, per item, the
indices of its images and captions; `item_scores` turns embeddings into an
(items, images, captions) array of cosine similarities, and one function per benchmark
turns that array into the benchmark's own metrics (definitions in
../shared/notes/methods.md, section 7):

- SugarCrepe / the built-in probe: accuracy = mean[s(img, pos) > s(img, neg)], strict.
- ARO VG-Relation / VG-Attribution: argmax over [false, true] == true (np.argmax, so a
  tie counts as wrong), averaged per relation / attribute pair, then macro-averaged;
  ARO's symmetric relations are left out and attribute pairs need 25 items.
- ARO COCO-Order / Flickr30k-Order: argmax over [true, 4 shuffled] == 0 (a tie counts
  as right, as np.argmax in ARO's code).
- Winoground: text, image and group scores, strict inequalities.
- CREPE: rank of the positive among its hard negatives (ties count against it),
  R@1/3/5/10 and mean rank.
- SVO probes: positive, negative and macro accuracy of match decisions per subject /
  verb / object negatives, plus pairwise accuracy s(sent, pos) > s(sent, neg).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlp_jax.input_pipeline.image_sources import ImageSource

PAD = -1  # Missing caption slot (CREPE items have different numbers of negatives).


@dataclasses.dataclass
class MatchingSet:
  """Items of images x captions; `item_images`/`item_texts` index `images`/`texts`."""

  name: str
  images: list[ImageSource]
  texts: list[str]
  item_images: np.ndarray  # (items, images per item) int
  item_texts: np.ndarray  # (items, captions per item) int, PAD where absent
  groups: dict[str, np.ndarray]  # per-item labels: subset, relation, tag...

  def __post_init__(self) -> None:
    if len(self.item_images) != len(self.item_texts):
      raise ValueError("item_images and item_texts differ in length")
    if not len(self.item_images):
      raise ValueError(f"{self.name}: no items")


class Interner:
  """Collects unique images/texts and hands out their indices."""

  def __init__(self) -> None:
    self.images: list[ImageSource] = []
    self.texts: list[str] = []
    self._image_ids: dict[object, int] = {}
    self._text_ids: dict[str, int] = {}

  def image(self, source: ImageSource) -> int:
    if source not in self._image_ids:
      self._image_ids[source] = len(self.images)
      self.images.append(source)
    return self._image_ids[source]

  def text(self, text: str) -> int:
    if text not in self._text_ids:
      self._text_ids[text] = len(self.texts)
      self.texts.append(text)
    return self._text_ids[text]

  def matching_set(
    self,
    name: str,
    item_images: Any,
    item_texts: Any,
    groups: dict[str, np.ndarray] | None = None,
  ) -> MatchingSet:
    """The benchmark's items over the images and texts collected so far."""
    return MatchingSet(
      name, self.images, self.texts, np.asarray(item_images), np.asarray(item_texts), groups or {}
    )


def item_scores(
  image_emb: np.ndarray, text_emb: np.ndarray, item_images: np.ndarray, item_texts: np.ndarray
) -> np.ndarray:
  """(items, I, T) cosine similarities; -inf where a caption slot is PAD."""
  images = image_emb[item_images]  # (N, I, D)
  texts = text_emb[np.maximum(item_texts, 0)]  # (N, T, D)
  scores = np.einsum("nid,ntd->nit", images, texts)
  return np.where((item_texts != PAD)[:, None, :], scores, -np.inf)


def _mean(x: np.ndarray) -> float:
  return float(np.mean(x)) if len(x) else float("nan")


def pairwise_accuracy(scores: np.ndarray, subsets: np.ndarray) -> dict[str, float]:
  """SugarCrepe: scores (N, 1, 2) as [positive, negative]; accuracy per subset and their mean."""
  correct = scores[:, 0, 0] > scores[:, 0, 1]
  metrics = {str(s): _mean(correct[subsets == s]) for s in sorted(set(subsets.tolist()))}
  metrics["mean"] = float(np.mean(list(metrics.values())))
  return metrics


def load_list(name: str) -> list[str]:
  """A packaged data list (vlp_jax/evaluation/templates/<name>), one entry per line."""
  text = importlib.resources.files("vlp_jax.evaluation").joinpath("templates", name).read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def aro_vg_accuracy(
  scores: np.ndarray,
  groups: np.ndarray,
  *,
  exclude: Sequence[str] = (),
  min_count: int = 1,
) -> dict[str, float]:
  """VG-Relation / VG-Attribution: scores (N, 1, 2) as [false, true] captions.

  Returns the macro accuracy over groups (relations or "attr1_attr2" pairs) with at
  least `min_count` items and not in `exclude`, the micro accuracy over all items, and
  the number of groups averaged.
  """
  correct = np.argmax(scores[:, 0, :], axis=-1) == 1
  names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
  per_group = np.bincount(inverse, weights=correct) / counts
  keep = (counts >= min_count) & ~np.isin(names, list(exclude))
  return {
    "macro_accuracy": _mean(per_group[keep]),
    "accuracy": _mean(correct),
    "num_groups": float(keep.sum()),
  }


def order_precision(scores: np.ndarray) -> float:
  """COCO-Order / Flickr30k-Order: scores (N, 1, 5), the true caption first."""
  return _mean(np.argmax(scores[:, 0, :], axis=-1) == 0)


def winoground_scores(scores: np.ndarray) -> dict[str, float]:
  """scores (N, 2, 2) as [image, caption]; image i belongs with caption i."""
  c0_i0, c1_i0 = scores[:, 0, 0], scores[:, 0, 1]
  c0_i1, c1_i1 = scores[:, 1, 0], scores[:, 1, 1]
  text = (c0_i0 > c1_i0) & (c1_i1 > c0_i1)  # each image prefers its own caption
  image = (c0_i0 > c0_i1) & (c1_i1 > c1_i0)  # each caption prefers its own image
  return {
    "text_score": _mean(text),
    "image_score": _mean(image),
    "group_score": _mean(text & image),
  }


def positive_ranks(scores: np.ndarray) -> np.ndarray:
  """CREPE: rank (0 = best) of caption 0 among an item's captions; ties count against it."""
  row = scores[:, 0, :]
  return (row[:, 1:] >= row[:, :1]).sum(axis=1)


def crepe_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 3, 5, 10)) -> dict[str, float]:
  metrics = {f"R@{k}": _mean(ranks < k) for k in ks}
  metrics["mean_rank"] = float(np.mean(ranks) + 1)
  metrics["median_rank"] = float(np.floor(np.median(ranks)) + 1)
  return metrics


def svo_metrics(
  pos_scores: np.ndarray,
  neg_scores: np.ndarray,
  pos_pairs: np.ndarray,
  neg_pairs: np.ndarray,
  kinds: np.ndarray,
  threshold: float | None = None,
) -> dict[str, float]:
  """SVO probes: per row, s(sentence, positive image) and s(sentence, negative image).

  `pos_pairs`/`neg_pairs` identify each (sentence, image) pair so that pairs shared by
  several rows count once, as in the official notebook. A pair is judged a match when its
  score exceeds `threshold`; without one, the threshold that maximises the macro accuracy
  over all rows is used (an oracle: reported as `threshold`). `kinds` is "subj", "verb"
  or "obj" per row (rows with several negative kinds are excluded by the reader).
  """
  if threshold is None:
    threshold = _best_threshold(pos_scores, neg_scores, pos_pairs, neg_pairs)
  metrics: dict[str, float] = {"threshold": float(threshold)}
  for kind in ("all", "subj", "verb", "obj"):
    rows = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
    _, pos_first = np.unique(pos_pairs[rows], return_index=True)
    _, neg_first = np.unique(neg_pairs[rows], return_index=True)
    pos_acc = _mean(pos_scores[rows][pos_first] > threshold)
    neg_acc = _mean(neg_scores[rows][neg_first] <= threshold)
    metrics[f"{kind}/pos_accuracy"] = pos_acc
    metrics[f"{kind}/neg_accuracy"] = neg_acc
    metrics[f"{kind}/accuracy"] = (pos_acc + neg_acc) / 2
    metrics[f"{kind}/pairwise_accuracy"] = _mean(pos_scores[rows] > neg_scores[rows])
  return metrics


def _best_threshold(
  pos_scores: np.ndarray, neg_scores: np.ndarray, pos_pairs: np.ndarray, neg_pairs: np.ndarray
) -> float:
  _, pos_first = np.unique(pos_pairs, return_index=True)
  _, neg_first = np.unique(neg_pairs, return_index=True)
  pos, neg = np.sort(pos_scores[pos_first]), np.sort(neg_scores[neg_first])
  values = np.unique(np.concatenate([pos, neg]))
  candidates = np.concatenate([[values[0] - 1.0], values])  # "match iff score > candidate"
  pos_acc = 1.0 - np.searchsorted(pos, candidates, side="right") / len(pos)
  neg_acc = np.searchsorted(neg, candidates, side="right") / len(neg)
  return float(candidates[np.argmax(pos_acc + neg_acc)])
