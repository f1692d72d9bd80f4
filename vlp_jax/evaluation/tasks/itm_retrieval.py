"""Retrieval ranked by the method's matching head ("match_image" + "match_score",
evaluation/rerank.py), for models without embeddings (single-stream): every (image,
caption) pair is scored once, as VLC's compute_irtr_recall does, or, with a dual encoder
named by config.eval.itm_retrieval.shortlist (a run of a method with embeddings, or a
converted CLIP), only each query's shortlist_k nearest by its embeddings, a true match
outside the shortlist counting as a miss.

Dataset: config.eval.data.itm_retrieval, "heldout" (the run's eval shards) or a
zeroshot_retrieval spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vlp_jax.config_lib import at_least
from vlp_jax.evaluation import readers, rerank
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.retrieval import retrieval_metrics
from vlp_jax.evaluation.tasks import retrieval
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef
from vlp_jax.evaluation.tasks.shortlist import DualEncoder, load_dual_encoder

NAME = "itm_retrieval"
HELDOUT = "heldout"  # The dataset that is the run's own eval shards.


class ItmRetrievalTask(Task):
  """Image and text retrieval ranked by the matching head: over every pair, or over each
  query's `shortlist_k` nearest by a dual encoder's embeddings (computed once)."""

  name = NAME

  def __init__(
    self,
    data: readers.RetrievalSet,
    predict_fns: Mapping[str, Any],
    ks: Sequence[int],
    shortlist: DualEncoder | None = None,
    shortlist_k: int = 0,
  ):
    self.data, self.predict_fns, self.ks = data, dict(predict_fns), tuple(ks)
    self.shortlist, self.shortlist_k = shortlist, shortlist_k
    self._matchers: dict[int, rerank.Matcher] = {}
    self._embeddings: tuple[np.ndarray, np.ndarray] | None = None

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    if id(embedder) not in self._matchers:
      self._matchers[id(embedder)] = rerank.Matcher(self.predict_fns, embedder)
    matcher, data = self._matchers[id(embedder)], self.data
    texts = [c for captions in data.captions for c in captions]
    text_to_image = np.repeat(np.arange(len(data.captions)), [len(c) for c in data.captions])
    num_images, num_texts = len(data.images), len(texts)
    if self.shortlist is not None:
      metrics = self._shortlisted(matcher, embedder, params, texts, text_to_image)
    else:
      logging.info("%s: scoring all %d image-caption pairs", data.name, num_images * num_texts)
      states = matcher.image_states(params, data.images, f"{data.name} match images")
      tokens = np.asarray(embedder.tokenizer(texts), np.int32)
      image_index = np.repeat(np.arange(num_images), num_texts)
      text_index = np.tile(np.arange(num_texts), num_images)
      scores = matcher.score_pairs(params, states, tokens, image_index, text_index)
      scores = scores.reshape(num_images, num_texts)
      # Unit image "embeddings" make the text x image similarity the score matrix itself,
      # so the recalls (and their tie rules) are retrieval.py's.
      metrics = retrieval_metrics(
        np.eye(num_images, dtype=np.float32), scores.T, text_to_image, self.ks
      )
    metrics.update(num_images=float(num_images), num_texts=float(num_texts))
    return [Result(self.name, data.name, metrics, retrieval.recall_headline(self.ks))]

  def _shortlisted(
    self,
    matcher: rerank.Matcher,
    embedder: Embedder,
    params: Any,
    texts: list[str],
    text_to_image: np.ndarray,
  ) -> dict[str, float]:
    data = self.data
    if self._embeddings is None:  # The dual encoder does not train: embed once.
      self._embeddings = self.shortlist.embed(embedder, data.images, texts, data.name)
      self.shortlist = dataclasses.replace(self.shortlist, params=None)  # Frees its weights.
    image_emb, text_emb = self._embeddings
    logging.info(
      "%s: re-ranking the %d nearest of each query by %s",
      data.name,
      self.shortlist_k,
      self.shortlist.path,
    )
    return rerank.reranked_retrieval(
      matcher,
      params,
      image_emb,
      text_emb,
      text_to_image,
      data.images,
      texts,
      self.shortlist_k,
      self.ks,
      desc=data.name,
      misses_outside=True,
    )


def create(ctx: Context) -> list[Task]:
  flag, config = f"--data.{NAME}", ctx.config
  text = ctx.dataset(NAME, " or heldout")
  if text == HELDOUT:
    data = ctx.read_heldout(f"{flag}=heldout")
  else:
    specs = readers.parse_specs(text, flag, retrieval.OPTIONS)
    if len(specs) != 1:
      raise ValueError(f"{flag} takes one dataset, got {len(specs)}")
    data = readers.read_retrieval(specs[0], config.eval.max_captions)
  options, shortlist = config.eval[NAME], None
  if options.shortlist:
    if options.shortlist_k < 1:
      raise ValueError(f"config.eval.{NAME}.shortlist_k={options.shortlist_k}: give k >= 1")
    shortlist = load_dual_encoder(options.shortlist, run_config=ctx.run_config)
  return [
    ItmRetrievalTask(data, ctx.predict_fns, config.eval.recall_ks, shortlist, options.shortlist_k)
  ]


def _options() -> ml_collections.ConfigDict:
  """config.eval.itm_retrieval."""
  options = ml_collections.ConfigDict()
  # The dual encoder whose shortlist_k nearest candidates per query the matching head
  # re-ranks: a run's workdir (a method with embeddings: CLIP, NegCLIP, ALBEF...) or a
  # converted CLIP directory (python -m vlp_jax.weights.convert); a true match outside the
  # shortlist is a miss. "": the head scores every pair (VLC's compute_irtr_recall; small sets).
  options.shortlist = ""
  options.shortlist_k = 128
  return options


TASK = TaskDef(
  NAME,
  rerank.MATCH_FNS,
  create,
  needs_what="matching head",
  options=_options,
  rules={"shortlist_k": at_least(1)},
)
