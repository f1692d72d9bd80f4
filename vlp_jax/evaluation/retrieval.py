"""Zero-shot image-text retrieval with CLIP_benchmark's definitions.

text->image recall@k: a text is a hit if its image is among its top k images.
image->text recall@k: an image is a hit if ANY of its captions is among its top k texts.
Ties are broken by index (a stable sort of descending scores), so a degenerate model
whose scores are all equal gets chance-level recall, not a perfect one. CLIP_benchmark
takes torch.topk's order, which is arbitrary among equal scores: the two agree exactly
unless a tie straddles the k-th place. Scores are computed in blocks of bounded size.
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


# A block of scores holds at most this many floats (64 MiB): memory stays bounded
# whatever the set size (25,000 captions x 5,000 images for COCO's test split).
BLOCK_ELEMENTS = 1 << 24


def _block_rows(block: int | None, num_columns: int) -> int:
  return block if block else max(1, BLOCK_ELEMENTS // max(num_columns, 1))


def text_to_image_ranks(
  image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, block: int | None = None
) -> np.ndarray:
  """Position of each text's own image among all images (0 = best)."""
  ranks = np.empty(len(text_emb), np.int64)
  rows = _block_rows(block, len(image_emb))
  for start in range(0, len(text_emb), rows):
    scores = text_emb[start : start + rows] @ image_emb.T
    ranks[start : start + rows] = _stable_positions(scores, text_to_image[start : start + rows])
  return ranks


def image_to_text_ranks(
  image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, block: int | None = None
) -> np.ndarray:
  """Position of each image's best-placed caption among all texts (0 = best).

  The best-placed caption is the one first in (descending score, ascending index)
  order, so only its position is computed: one pass per block, however many captions.
  """
  order = np.argsort(text_to_image, kind="stable")
  counts = np.bincount(text_to_image, minlength=len(image_emb))
  # captions[i, j]: the j-th caption of image i in index order, -1 where image i has fewer.
  captions = np.full((len(image_emb), max(int(counts.max(initial=0)), 1)), -1, np.int64)
  slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
  captions[text_to_image[order], slot] = order
  ranks = np.empty(len(image_emb), np.int64)
  rows = _block_rows(block, len(text_emb))
  for start in range(0, len(image_emb), rows):
    scores = image_emb[start : start + rows] @ text_emb.T
    own = captions[start : start + rows]
    own_scores = np.take_along_axis(scores, np.maximum(own, 0), axis=1)
    own_scores = np.where(own >= 0, own_scores, -np.inf)
    # argmax takes the first maximum: among equal scores, the lowest text index.
    best = own[np.arange(len(own)), np.argmax(own_scores, axis=1)]
    ranks[start : start + rows] = _stable_positions(scores, best)
  return ranks


def retrieval_metrics(
  image_emb: np.ndarray,
  text_emb: np.ndarray,
  text_to_image: np.ndarray,
  ks: Sequence[int] = DEFAULT_KS,
  block: int | None = None,
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
  return metrics_from_ranks(t2i, i2t, ks)


def metrics_from_ranks(
  t2i: np.ndarray, i2t: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
  """Recall@k from 0-based ranks: each text's own image (t2i), each image's best-placed
  caption (i2t). Shared with ITM re-ranked retrieval (rerank.py)."""
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
