"""Image-caption matching sets (the compositional benchmarks): each item's images scored
against its captions by embedding similarity, and by the matching head when the method
has one (config.eval.rerank_k > 0: a "<task>_itm" result beside the embedding one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vlp_jax.evaluation import compositional, rerank
from vlp_jax.evaluation.compositional import MatchingSet
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks.base import Result, Task

ScoreFn = Callable[[np.ndarray, MatchingSet], dict[str, float]]


class MatchingTask(Task):
  """Scores each item's images against its captions; one scoring function per set."""

  def __init__(
    self,
    name: str,
    dataset: str,
    sets: dict[str, tuple[MatchingSet, ScoreFn]],
    headline: list[str],
    extra: dict[str, float] | None = None,
    matcher: rerank.Matcher | None = None,
    itm_score_fns: dict[str, ScoreFn] | None = None,
  ):
    self.name, self.dataset, self.sets = name, dataset, sets
    self.headline, self.extra = headline, dict(extra or {})
    # ITM scores are logits, not cosines: a set may score them its own way (SVO's
    # threshold), else as the embeddings.
    self.matcher, self.itm_score_fns = matcher, dict(itm_score_fns or {})

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    metrics: dict[str, float] = dict(self.extra)
    itm_metrics: dict[str, float] = dict(self.extra)
    for prefix, (data, score_fn) in self.sets.items():
      image_emb = embedder.images(params, data.images, desc=f"{self.name} {prefix} images")
      text_emb = embedder.texts(params, data.texts, desc=f"{self.name} {prefix} texts")
      scores = compositional.item_scores(image_emb, text_emb, data.item_images, data.item_texts)
      _add(metrics, prefix, score_fn(scores, data), len(scores))
      if self.matcher is not None:
        desc = f"{self.name} {prefix}".strip()
        scores = rerank.item_scores(
          self.matcher, params, data.images, data.texts, data.item_images, data.item_texts, desc
        )
        itm_fn = self.itm_score_fns.get(prefix, score_fn)
        _add(itm_metrics, prefix, itm_fn(scores, data), len(scores))
    headline = [k for k in self.headline if k in metrics]
    results = [Result(self.name, self.dataset, metrics, headline)]
    if self.matcher is not None:
      results.append(Result(f"{self.name}_itm", self.dataset, itm_metrics, headline))
    return results


def _add(metrics: dict[str, float], prefix: str, found: dict[str, float], items: int) -> None:
  metrics.update({f"{prefix}/{k}" if prefix else k: v for k, v in found.items()})
  metrics[f"{prefix}/num_items" if prefix else "num_items"] = float(items)
