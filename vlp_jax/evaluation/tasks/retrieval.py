"""Zero-shot retrieval: "heldout" (the run's own eval shards; the built-in set adds its
compositional probe) and "zeroshot_retrieval" (Karpathy-split JSONs, CLIP_benchmark's
recall@k).

With the method's matching head (rerank.Matcher, config.eval.rerank_k > 0) each adds an
"itm_retrieval" result (ALBEF's re-ranked protocol) and a "compositional_itm" probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from vlp_jax.evaluation import compositional, readers, rerank
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.retrieval import retrieval_metrics
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef

EMBEDDINGS = ("embed_image", "embed_text")
OPTIONS = ("images", "split", "name")  # Of a config.eval.data.zeroshot_retrieval spec.


def recall_headline(ks: Sequence[int]) -> list[str]:
  return [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in ks]


class RetrievalTask(Task):
  """Zero-shot retrieval; records with negatives also get the compositional probe."""

  name = "zeroshot_retrieval"

  def __init__(
    self,
    data: readers.RetrievalSet,
    ks: Sequence[int],
    heldout: bool = False,
    matcher: rerank.Matcher | None = None,
    rerank_k: int = 0,
  ):
    self.data, self.ks, self.heldout = data, tuple(ks), heldout
    self.matcher, self.rerank_k = (matcher, rerank_k) if rerank_k > 0 else (None, 0)
    if data.skipped:
      logging.warning("%s: %d unreadable records skipped", data.name, data.skipped)

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    data = self.data
    texts = [c for captions in data.captions for c in captions]
    text_to_image = np.repeat(np.arange(len(data.captions)), [len(c) for c in data.captions])
    first_caption = np.cumsum([0] + [len(c) for c in data.captions[:-1]])
    negatives, owner, kinds = [], [], []
    for image, found in enumerate(data.negatives or []):
      for kind, caption in sorted(found.items()):
        negatives.append(caption)
        owner.append(image)
        kinds.append(kind)
    image_emb = embedder.images(params, data.images, desc=f"{data.name} images")
    text_emb = embedder.texts(params, texts + negatives, desc=f"{data.name} texts")
    metrics = retrieval_metrics(image_emb, text_emb[: len(texts)], text_to_image, self.ks)
    metrics.update(num_images=float(len(image_emb)), num_texts=float(len(texts)))
    results = [Result(self.name, data.name, metrics, recall_headline(self.ks), self.heldout)]
    if negatives:
      owner = np.asarray(owner)
      pos = np.sum(image_emb[owner] * text_emb[first_caption[owner]], axis=1)
      neg = np.sum(image_emb[owner] * text_emb[len(texts) :], axis=1)
      probe = compositional.pairwise_accuracy(np.stack([pos, neg], -1)[:, None], np.asarray(kinds))
      results.append(Result("compositional", data.name, probe, list(probe)))
    if self.matcher is not None:
      results.extend(self._itm_results(params, image_emb, text_emb, texts, negatives, owner, kinds))
    return results

  def _itm_results(
    self,
    params: Any,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    texts: list[str],
    negatives: list[str],
    owner: list[int],
    kinds: list[str],
  ) -> list[Result]:
    """ALBEF's re-ranked retrieval, and the probe scored by the matching head."""
    data = self.data
    text_to_image = np.repeat(np.arange(len(data.captions)), [len(c) for c in data.captions])
    metrics = rerank.reranked_retrieval(
      self.matcher,
      params,
      image_emb,
      text_emb[: len(texts)],
      text_to_image,
      data.images,
      texts,
      self.rerank_k,
      self.ks,
      desc=data.name,
    )
    results = [Result("itm_retrieval", data.name, metrics, recall_headline(self.ks))]
    if negatives:
      first_caption = np.cumsum([0] + [len(c) for c in data.captions[:-1]])
      owner = np.asarray(owner)
      item_texts = np.stack([first_caption[owner], len(texts) + np.arange(len(negatives))], -1)
      scores = rerank.item_scores(
        self.matcher,
        params,
        data.images,
        texts + negatives,
        owner[:, None],
        item_texts,
        desc=f"{data.name} probe",
      )
      probe = compositional.pairwise_accuracy(scores, np.asarray(kinds))
      results.append(Result("compositional_itm", data.name, probe, list(probe)))
    return results


def _create(ctx: Context, data: readers.RetrievalSet, heldout: bool) -> RetrievalTask:
  ev = ctx.config.eval
  return RetrievalTask(data, ev.recall_ks, heldout, ctx.matcher, ev.rerank_k)


def create_heldout(ctx: Context) -> list[Task]:
  return [_create(ctx, ctx.read_heldout("the heldout task"), True)]


def create_zeroshot(ctx: Context) -> list[Task]:
  max_captions = ctx.config.eval.max_captions
  return [
    _create(ctx, readers.read_retrieval(spec, max_captions), False)
    for spec in ctx.specs("zeroshot_retrieval", OPTIONS)
  ]


HELDOUT = TaskDef("heldout", EMBEDDINGS, create_heldout, reads_data=False)
ZEROSHOT = TaskDef("zeroshot_retrieval", EMBEDDINGS, create_zeroshot)
