"""The compositional benchmarks as matching tasks, each in its official format and with
its official score (compositional_readers.py, compositional.py): sugarcrepe, aro,
winoground, crepe, svo. Each reads one dataset from config.eval.data.<task>."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from vlp_jax.config_lib import in_range
from vlp_jax.evaluation import compositional, readers
from vlp_jax.evaluation import compositional_readers as creaders
from vlp_jax.evaluation.compositional import MatchingSet
from vlp_jax.evaluation.tasks.base import Context, Task, TaskDef
from vlp_jax.evaluation.tasks.matching import MatchingTask, ScoreFn

EMBEDDINGS = ("embed_image", "embed_text")


def _spec(ctx: Context, name: str, options: Sequence[str]) -> readers.DatasetSpec:
  specs = ctx.specs(name, options)
  if len(specs) != 1:
    raise ValueError(f"--data.{name} takes one dataset, got {len(specs)}")
  return specs[0]


def _single(
  name: str,
  dataset: str,
  read: Callable[[readers.DatasetSpec], MatchingSet],
  score: ScoreFn,
  headline: list[str],
) -> TaskDef:
  """A benchmark of one matching set read from a spec with an images= option."""

  def create(ctx: Context) -> list[Task]:
    data = read(_spec(ctx, name, ("images",)))
    return [MatchingTask(name, dataset, {"": (data, score)}, headline, matcher=ctx.matcher)]

  return TaskDef(name, EMBEDDINGS, create)


# ------------------------------------------------------------------------ sugarcrepe


def _sugarcrepe(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  return compositional.pairwise_accuracy(scores, data.groups["subset"])


SUGARCREPE = _single(
  "sugarcrepe",
  "sugar_crepe",
  lambda spec: creaders.read_sugarcrepe(spec.path, spec.get("images")),
  _sugarcrepe,
  [*creaders.SUGARCREPE_SUBSETS, "mean"],
)

# ------------------------------------------------------------------------------- aro


def _vg_relation(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  excluded = compositional.load_list("aro_vg_relation_excluded.txt")
  return compositional.aro_vg_accuracy(scores, data.groups["group"], exclude=excluded)


def _vg_attribution(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  return compositional.aro_vg_accuracy(scores, data.groups["group"], min_count=25)


def _order(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  return {"precision@1": compositional.order_precision(scores)}


_ARO_SCORES = {
  "vg_relation": _vg_relation,
  "vg_attribution": _vg_attribution,
  "coco_order": _order,
  "flickr30k_order": _order,
}
_ARO_OPTIONS = ("images", "coco_order", "coco_images", "flickr_order", "flickr_images")


def _create_aro(ctx: Context) -> list[Task]:
  spec = _spec(ctx, "aro", _ARO_OPTIONS)
  found = creaders.read_aro(spec.path, spec.options)
  sets = {k: (v, _ARO_SCORES[k]) for k, v in found.items()}
  headline = [
    "vg_relation/macro_accuracy",
    "vg_attribution/macro_accuracy",
    "coco_order/precision@1",
    "flickr30k_order/precision@1",
  ]
  return [MatchingTask("aro", "aro", sets, headline, matcher=ctx.matcher)]


ARO = TaskDef("aro", EMBEDDINGS, _create_aro)

# ------------------------------------------------------------------------ winoground


def _winoground(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  metrics = compositional.winoground_scores(scores)
  tags = data.groups["tag"]
  for tag in sorted(set(tags.tolist()) - {""}):
    found = compositional.winoground_scores(scores[tags == tag])
    metrics.update({f"{tag}/{k}": v for k, v in found.items()})
  return metrics


WINOGROUND = _single(
  "winoground",
  "winoground",
  lambda spec: creaders.read_winoground(spec.path, spec.get("images")),
  _winoground,
  ["text_score", "image_score", "group_score"],
)

# ----------------------------------------------------------------------------- crepe


def _crepe(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  ranks = compositional.positive_ranks(scores)
  metrics = compositional.crepe_metrics(ranks)
  subsets = data.groups["subset"]
  for subset in sorted(set(subsets.tolist())):
    found = compositional.crepe_metrics(ranks[subsets == subset])
    metrics.update({f"{subset}/{k}": v for k, v in found.items()})
  return metrics


def _read_crepe(spec: readers.DatasetSpec) -> MatchingSet:
  images = spec.get("images")
  folders = (
    [f for f in images.split(os.pathsep) if f] if images else [os.path.join(spec.path, "images")]
  )
  return creaders.read_crepe(spec.path, folders)


CREPE = _single("crepe", "crepe", _read_crepe, _crepe, ["R@1", "R@3", "R@5", "R@10", "mean_rank"])

# ------------------------------------------------------------------------------- svo


def _svo(threshold: float | None) -> ScoreFn:
  def score(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
    g = data.groups
    return compositional.svo_metrics(
      scores[:, 0, 0], scores[:, 1, 0], g["pos_pair"], g["neg_pair"], g["kind"], threshold
    )

  return score


def _create_svo(ctx: Context) -> list[Task]:
  spec = _spec(ctx, "svo", ("images",))
  data, dropped = creaders.read_svo(spec.path, spec.get("images"))
  headline = [
    "all/accuracy",
    "all/pos_accuracy",
    "all/neg_accuracy",
    "subj/accuracy",
    "verb/accuracy",
    "obj/accuracy",
    "all/pairwise_accuracy",
  ]
  sets = {"": (data, _svo(ctx.config.eval.svo.threshold))}
  # A cosine threshold means nothing for ITM logits: those take the oracle threshold.
  task = MatchingTask(
    "svo",
    "svo_probes",
    sets,
    headline,
    {"num_rows_dropped": float(dropped)},
    matcher=ctx.matcher,
    itm_score_fns={"": _svo(None)},
  )
  return [task]


def _svo_options() -> ml_collections.ConfigDict:
  """config.eval.svo."""
  options = ml_collections.ConfigDict()
  # A pair matches when its cosine similarity exceeds this; None: the threshold that
  # maximises the macro accuracy (an oracle, reported with the metrics).
  options.threshold = ml_collections.FieldReference(None, field_type=float)
  return options


SVO = TaskDef(
  "svo",
  EMBEDDINGS,
  _create_svo,
  options=_svo_options,
  rules={"threshold": in_range(-1, 1)},  # A cosine similarity.
)
