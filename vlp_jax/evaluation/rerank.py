"""Retrieval and matching with an image-text matching head (ALBEF's protocol).

ALBEF ranks in two stages (its Retrieval.py): each query's top k candidates by ITA
similarity are re-scored by the ITM head (the "matched" logit) and put first, in ITM
order; every other candidate comes after them. Recall@k then follows CLIP_benchmark's
definitions as plain retrieval does (retrieval.py): ties by index, an image is a hit
when any of its captions is within k.

`Matcher` runs a method's two prediction functions on the mesh:
- "match_image": (params, uint8 images (B, S, S, 3)) -> a per-row pytree (ALBEF: the
  image tokens; a single-stream model may return the pixels or patch embeddings);
- "match_score": (params, that pytree's rows, tokens (B, T)) -> (B,) match scores.
Image states are computed once per image and kept on the host (ALBEF ViT-B/16 at 256 px:
790 kB per image), then gathered per batch of (image, text) pairs. Unlike ALBEF, which
reuses the text-only states, every pair re-runs the text encoder: one interface for
dual- and single-stream models.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlp_jax import preemption, sharding
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.retrieval import BLOCK_ELEMENTS, DEFAULT_KS, metrics_from_ranks
from vlp_jax.input_pipeline.image_sources import ImageSource

MATCH_FNS = ("match_image", "match_score")


class Matcher:
  """ITM scores of (image, text) pairs through a method's match functions."""

  def __init__(self, predict_fns: dict[str, Any], embedder: Embedder):
    self.embedder = embedder
    match_image, match_score = (predict_fns[name] for name in MATCH_FNS)
    self._match_image = match_image
    self._structure: tuple[Any, list[tuple[tuple[int, ...], Any]]] | None = None

    def flat_state(params: Any, images: jax.Array) -> jax.Array:
      # One (B, D) float32 array per image, so the embedder's loading, sharding and
      # gathering serve any pytree the method returns.
      leaves = jax.tree.leaves(match_image(params, images))
      return jax.numpy.concatenate(
        [x.reshape(x.shape[0], -1).astype(jax.numpy.float32) for x in leaves], axis=1
      )

    self._state_embedder = Embedder(
      {"embed_image": flat_state},
      embedder.mesh,
      embedder.tokenizer,
      batch_size=embedder.batch_size,
      image_size=embedder.image_size,
      read_threads=embedder.read_threads,
      show_progress=embedder.show_progress,
    )

    def score(params: Any, batch: dict[str, Any]) -> dict[str, jax.Array]:
      return {"score": match_score(params, batch["state"], batch["tokens"]), "row": batch["row"]}

    self._score = jax.jit(score, out_shardings=sharding.batch_sharding(embedder.mesh))

  def _leaf_shapes(self, params: Any) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
    if self._structure is None:
      size = self.embedder.image_size
      probe = jax.ShapeDtypeStruct((1, size, size, 3), np.uint8)
      out = jax.eval_shape(self._match_image, params, probe)
      leaves, treedef = jax.tree.flatten(out)
      self._structure = treedef, [(x.shape[1:], x.dtype) for x in leaves]
    return self._structure

  def image_states(
    self, params: Any, images: Sequence[ImageSource], desc: str = "match images"
  ) -> list[np.ndarray]:
    """Every image's match state: the pytree's leaves, each (N, ...) on the host."""
    _, leaves = self._leaf_shapes(params)
    flat = self._state_embedder.images(params, images, len(images), desc)
    sizes = [math.prod(shape) for shape, _ in leaves]
    parts = np.split(flat, np.cumsum(sizes)[:-1], axis=1) if flat.size else []
    return [
      p.reshape(len(images), *shape).astype(dtype) for p, (shape, dtype) in zip(parts, leaves)
    ]

  def score_pairs(
    self,
    params: Any,
    states: list[np.ndarray],
    tokens: np.ndarray,
    image_index: np.ndarray,
    text_index: np.ndarray,
    desc: str = "match pairs",
  ) -> np.ndarray:
    """(P,) float32 match scores of the pairs (states[image_index[p]], tokens[text_index[p]])."""
    treedef, _ = self._leaf_shapes(params)
    embedder = self.embedder
    count = len(image_index)
    steps = math.ceil(count / embedder.batch_size)
    local = embedder.local_batch
    outputs = []
    for step in range(steps):
      preemption.check_stop()  # A SIGTERM stops the evaluation between batches.
      start = step * embedder.batch_size + jax.process_index() * local
      rows = np.arange(start, start + local)
      valid = rows < count
      take = np.where(valid, rows, 0)
      leaves = [s[image_index[take]] for s in states]
      batch = sharding.host_to_global(
        {
          **{f"state_{i}": x for i, x in enumerate(leaves)},
          "tokens": tokens[text_index[take]],
          "row": np.where(valid, rows, -1).astype(np.int32),
        },
        embedder.mesh,
      )
      state = jax.tree.unflatten(treedef, [batch[f"state_{i}"] for i in range(len(leaves))])
      inputs = {"state": state, "tokens": batch["tokens"], "row": batch["row"]}
      outputs.append(self._score(params, inputs))
    if not outputs:
      return np.zeros((0,), np.float32)
    gathered = multihost_utils.process_allgather(outputs, tiled=True)
    scores = np.concatenate([np.asarray(o["score"], np.float32) for o in gathered])
    rows = np.concatenate([np.asarray(o["row"]) for o in gathered])
    result = np.zeros((count,), np.float32)
    result[rows[rows >= 0]] = scores[rows >= 0]
    return result


def create_matcher(predict_fns: dict[str, Any], embedder: Embedder) -> Matcher | None:
  """A Matcher when the method provides both match functions, else None."""
  if not all(name in predict_fns for name in MATCH_FNS):
    return None
  return Matcher(predict_fns, embedder)


# ---------------------------------------------------------------- ranking (NumPy)


def top_candidates(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
  """(Q, k) indices of each query's k best keys by dot product, ties by index."""
  k = min(k, len(keys))
  out = np.empty((len(queries), k), np.int64)
  rows = max(1, BLOCK_ELEMENTS // max(len(keys), 1))
  for start in range(0, len(queries), rows):
    scores = queries[start : start + rows] @ keys.T
    out[start : start + rows] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return out


def reranked_positions(
  candidates: np.ndarray, scores: np.ndarray, targets: np.ndarray
) -> np.ndarray:
  """Each query's best position of its targets when its candidates (Q, k) come first,
  ordered by `scores` (Q, k) descending (ties by index), and every other key after
  them in index order. targets (Q, C): the query's correct keys, -1 where absent."""
  k = candidates.shape[1]
  cand = candidates[:, None, :]  # (Q, 1, k)
  goal = targets[:, :, None]  # (Q, C, 1)
  hit = cand == goal  # (Q, C, k)
  found = hit.any(axis=-1)
  own = np.take_along_axis(scores, np.argmax(hit, axis=-1), axis=1)[..., None]  # (Q, C, 1)
  sc = scores[:, None, :]
  inside = (sc > own).sum(-1) + ((sc == own) & (cand < goal)).sum(-1)
  outside = k + targets - (cand < goal).sum(-1)  # Non-candidates before it, by index.
  positions = np.where(found, inside, outside)
  return np.where(targets >= 0, positions, np.iinfo(np.int64).max).min(axis=1)


def caption_table(text_to_image: np.ndarray, num_images: int) -> np.ndarray:
  """(images, most captions) text indices of each image's captions, -1 padded."""
  counts = np.bincount(text_to_image, minlength=num_images)
  table = np.full((num_images, max(int(counts.max(initial=0)), 1)), -1, np.int64)
  order = np.argsort(text_to_image, kind="stable")
  slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
  table[text_to_image[order], slot] = order
  return table


def reranked_retrieval(
  matcher: Matcher,
  params: Any,
  image_emb: np.ndarray,
  text_emb: np.ndarray,
  text_to_image: np.ndarray,
  images: Sequence[ImageSource],
  texts: Sequence[str],
  k: int,
  ks: Sequence[int] = DEFAULT_KS,
  desc: str = "",
  misses_outside: bool = False,
) -> dict[str, float]:
  """Recall@ks of ALBEF's protocol: the top k by ITA similarity, re-ranked by ITM.
  `misses_outside`: a target outside its query's shortlist is never found (a shortlist
  from another model, VLC's), instead of following the shortlist in index order."""
  text_to_image = np.asarray(text_to_image, np.int64)
  t2i_candidates = top_candidates(text_emb, image_emb, k)
  i2t_candidates = top_candidates(image_emb, text_emb, k)
  states = matcher.image_states(params, images, f"{desc} match images".strip())
  tokens = np.asarray(matcher.embedder.tokenizer(list(texts)), np.int32)
  num_texts, num_images = len(texts), len(images)
  t2i_scores = matcher.score_pairs(
    params,
    states,
    tokens,
    t2i_candidates.ravel(),
    np.repeat(np.arange(num_texts), t2i_candidates.shape[1]),
  ).reshape(t2i_candidates.shape)
  i2t_scores = matcher.score_pairs(
    params,
    states,
    tokens,
    np.repeat(np.arange(num_images), i2t_candidates.shape[1]),
    i2t_candidates.ravel(),
  ).reshape(i2t_candidates.shape)
  t2i = reranked_positions(t2i_candidates, t2i_scores, text_to_image[:, None])
  i2t = reranked_positions(i2t_candidates, i2t_scores, caption_table(text_to_image, num_images))
  if misses_outside:  # Shortlisted targets rank below k, the others at k or after.
    never = np.iinfo(np.int64).max
    t2i = np.where(t2i < t2i_candidates.shape[1], t2i, never)
    i2t = np.where(i2t < i2t_candidates.shape[1], i2t, never)
  metrics = metrics_from_ranks(t2i, i2t, ks)
  metrics["rerank_k"] = float(t2i_candidates.shape[1])
  return metrics


def item_scores(
  matcher: Matcher,
  params: Any,
  images: Sequence[ImageSource],
  texts: Sequence[str],
  item_images: np.ndarray,
  item_texts: np.ndarray,
  desc: str = "",
) -> np.ndarray:
  """(items, I, T) match scores of each item's images x captions (compositional
  tasks' layout, compositional.item_scores); -inf where a caption slot is -1."""
  states = matcher.image_states(params, images, f"{desc} match images".strip())
  tokens = np.asarray(matcher.embedder.tokenizer(list(texts)), np.int32)
  n, i, t = item_images.shape[0], item_images.shape[1], item_texts.shape[1]
  pairs = np.array(list(itertools.product(range(i), range(t))), np.int64)  # (I*T, 2)
  image_index = item_images[:, pairs[:, 0]].ravel()
  text_index = item_texts[:, pairs[:, 1]].ravel()
  present = text_index >= 0
  scores = np.full(image_index.shape, -np.inf, np.float32)
  scores[present] = matcher.score_pairs(
    params, states, tokens, image_index[present], text_index[present]
  )
  return scores.reshape(n, i, t)
