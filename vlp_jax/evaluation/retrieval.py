"""Zero-shot image-text retrieval with CLIP_benchmark's definitions.

text->image recall@k: a text is a hit if its image is among its top k images.
image->text recall@k: an image is a hit if ANY of its captions is among its top k texts.
Ties are broken by index (a stable sort of descending scores), so a degenerate model
whose scores are all equal gets chance-level recall, not a perfect one.
Scores are computed in blocks, so memory stays bounded for COCO-sized sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _stable_positions(scores: np.ndarray, columns: np.ndarray) -> np.ndarray:
  """Position of scores[r, columns[r]] in row r sorted by descending score, ties by index."""
  rows = np.arange(len(scores))
  target = scores[rows, columns][:, None]
  earlier = np.arange(scores.shape[1])[None, :] < columns[:, None]
  return (scores > target).sum(axis=1) + ((scores == target) & earlier).sum(axis=1)


def text_to_image_ranks(
  image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, block: int = 4096
) -> np.ndarray:
  """Position of each text's own image among all images (0 = best)."""
  ranks = np.empty(len(text_emb), np.int64)
  for start in range(0, len(text_emb), block):
    scores = text_emb[start : start + block] @ image_emb.T
    ranks[start : start + block] = _stable_positions(scores, text_to_image[start : start + block])
  return ranks


def image_to_text_ranks(
  image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, block: int = 4096
) -> np.ndarray:
  """Position of each image's best-placed caption among all texts (0 = best)."""
  order = np.argsort(text_to_image, kind="stable")
  counts = np.bincount(text_to_image, minlength=len(image_emb))
  # captions[i, j]: the j-th caption of image i, -1 where image i has fewer.
  captions = np.full((len(image_emb), max(int(counts.max(initial=0)), 1)), -1, np.int64)
  slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
  captions[text_to_image[order], slot] = order
  ranks = np.empty(len(image_emb), np.int64)
  for start in range(0, len(image_emb), block):
    scores = image_emb[start : start + block] @ text_emb.T
    best = np.full(len(scores), np.iinfo(np.int64).max)
    for column in captions[start : start + block].T:
      has = column >= 0
      positions = _stable_positions(scores, np.where(has, column, 0))
      best = np.where(has, np.minimum(best, positions), best)
    ranks[start : start + block] = best
  return ranks


def retrieval_metrics(
  image_emb: np.ndarray,
  text_emb: np.ndarray,
  text_to_image: np.ndarray,
  ks: Sequence[int] = DEFAULT_KS,
  block: int = 4096,
) -> dict[str, float]:
  """Recall@k in both directions, as fractions, named as CLIP_benchmark names them."""
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  text_to_image = np.asarray(text_to_image, np.int64)
  if len(text_emb) != len(text_to_image):
    raise ValueError(f"{len(text_emb)} texts but {len(text_to_image)} text->image labels")
  missing = np.setdiff1d(np.arange(len(image_emb)), text_to_image)
  if missing.size:
    raise ValueError(f"{missing.size} images have no caption, e.g. image {missing[0]}")
  t2i = text_to_image_ranks(image_emb, text_emb, text_to_image, block)
  i2t = image_to_text_ranks(image_emb, text_emb, text_to_image, block)
  metrics = {}
  for k in ks:
    metrics[f"image_retrieval_recall@{k}"] = float((t2i < k).mean())
    metrics[f"text_retrieval_recall@{k}"] = float((i2t < k).mean())
  return metrics


def format_table(metrics: dict[str, float], ks: Sequence[int] = DEFAULT_KS) -> str:
  """A small Markdown table of recall@k (%) in both directions."""
  header = "| direction | " + " | ".join(f"R@{k}" for k in ks) + " |"
  lines = [header, "|" + "---|" * (len(ks) + 1)]
  for label, prefix in (("text->image", "image"), ("image->text", "text")):
    values = " | ".join(f"{100 * metrics[f'{prefix}_retrieval_recall@{k}']:.1f}" for k in ks)
    lines.append(f"| {label} | {values} |")
  return "\n".join(lines)
