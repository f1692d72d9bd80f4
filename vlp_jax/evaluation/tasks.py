"""Evaluation tasks: datasets read once, embedded with the model, scored.

Each task reads its data when it is created (bad paths fail before any compute) and
`evaluate(embedder, params)` returns `Result`s: CLIP_benchmark's record (task, dataset,
metrics) plus the metrics shown in the summary table.

Tasks: heldout (retrieval on the run's eval shards; the built-in set adds its
compositional probe), zeroshot_retrieval, zeroshot_classification, linear_probe,
sugarcrepe, aro, winoground, crepe, svo.

With a `rerank.Matcher` (a method with an ITM head, config.eval.rerank_k > 0) the
retrieval tasks add an "itm_retrieval" result (ALBEF's re-ranked protocol) and the
compositional ones a "<task>_itm" result scored by the matching head, next to the
embedding-based ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vlp_jax.config_lib import EVAL_TASKS
from vlp_jax.evaluation import classification, compositional, linear_probe, readers, rerank
from vlp_jax.evaluation import classification_readers as cls_readers
from vlp_jax.evaluation import compositional_readers as creaders
from vlp_jax.evaluation.compositional import MatchingSet
from vlp_jax.evaluation.embedding import DataError, Embedder
from vlp_jax.evaluation.retrieval import retrieval_metrics

TASKS = EVAL_TASKS
# The prediction functions (a method's `predict_fns`) each task needs.
_EMBEDDINGS = ("embed_image", "embed_text")
TASK_NEEDS: dict[str, tuple[str, ...]] = {task: _EMBEDDINGS for task in TASKS}
TASK_NEEDS["linear_probe"] = ("embed_image",)
# Fine-tuning tasks (evaluation/finetune.py, which builds them) read a task head each.
TASK_NEEDS.update(
  vqa=("vqa_logits",),
  nlvr2=("nlvr2_logits",),
  classify_finetuned=("class_logits",),
  itm_retrieval=("match_image", "match_score"),
  agent_masking=("agent_logits",),  # evaluation/agent_report.py, on the held-out set.
)


# What a task's prediction functions are, in words (the rest need embeddings).
_WHAT = {
  "vqa": "vqa head",
  "nlvr2": "nlvr2 head",
  "classify_finetuned": "classification head",
  "itm_retrieval": "matching head",
  "agent_masking": "masking agent",
  "linear_probe": "image embedding",
}


def check_servable(names: Sequence[str], available: Sequence[str], method: str) -> None:
  """Raises ValueError naming the task and the method when a task needs a prediction
  function the method does not provide (checked before any data is read)."""
  for name in names:
    if name not in TASK_NEEDS:
      raise ValueError(f"unknown evaluation task {name!r}; known: {', '.join(TASKS)}")
    missing = [fn for fn in TASK_NEEDS[name] if fn not in available]
    if missing:
      raise ValueError(
        f"this run's method {method!r} offers no {_WHAT.get(name, 'embeddings')} for "
        f"evaluation task {name!r}: it needs {', '.join(missing)}, the method has "
        f"{', '.join(sorted(available)) or 'none'}"
      )


# Options each task's dataset spec accepts (see readers.parse_specs).
OPTIONS = {
  "zeroshot_retrieval": ("images", "split", "name"),
  "zeroshot_classification": (
    "split",
    "name",
    "classnames",
    "templates",
    "data_dir",
    "image_key",
    "label_key",
  ),
  "linear_probe": (
    "train_split",
    "val_split",
    "split",
    "name",
    "data_dir",
    "image_key",
    "label_key",
  ),
  "sugarcrepe": ("images",),
  "aro": ("images", "coco_order", "coco_images", "flickr_order", "flickr_images"),
  "winoground": ("images",),
  "crepe": ("images",),
  "svo": ("images",),
}


@dataclasses.dataclass
class Result:
  task: str
  dataset: str
  metrics: dict[str, float]
  headline: list[str]  # metric keys for the summary table, in order
  heldout: bool = False  # the run's own held-out retrieval (TensorBoard "eval/<metric>")
  # A benchmark's own files (file name -> writer(path)), written beside the result JSON
  # in <out>/step_<N>/<dataset>_<task>/ (a VQA test-dev submission, NLVR2 predictions).
  files: dict[str, Callable[[str], None]] = dataclasses.field(default_factory=dict)
  # Markdown texts (name -> text) for TensorBoard text summaries, written under
  # "eval/<task>/<dataset>/<name>" (CMask's most-masked words and per-class rates).
  texts: dict[str, str] = dataclasses.field(default_factory=dict)


class Task:
  name = ""

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    raise NotImplementedError


# -------------------------------------------------------------------------- retrieval


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
    headline = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in self.ks]
    results = [Result(self.name, data.name, metrics, headline, self.heldout)]
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
    headline = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in self.ks]
    results = [Result("itm_retrieval", data.name, metrics, headline)]
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


# --------------------------------------------------------------------- classification


class ZeroShotClassificationTask(Task):
  name = "zeroshot_classification"

  def __init__(self, data: cls_readers.ClassificationSet, templates: list[str] | dict):
    self.data, self.templates = data, templates
    # Fail now, not after embedding, if a class has no prompts.
    try:
      self.prompts, self.owner = classification.prompts(data.classnames, templates)
    except KeyError as e:
      raise DataError(f"{data.name}: {e.args[0]}") from e

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    data = self.data
    num_classes = len(data.classnames)
    text_emb = embedder.texts(params, self.prompts, desc=f"{data.name} prompts")
    classifier = classification.zeroshot_classifier(text_emb, self.owner, num_classes)
    image_emb = embedder.images(params, data.images, len(data.labels), f"{data.name} images")
    logits = classification.zeroshot_logits(image_emb, classifier)
    metrics = classification.classification_metrics(logits, data.labels, num_classes)
    return [Result(self.name, data.name, metrics, list(metrics))]


class LinearProbeTask(Task):
  name = "linear_probe"

  def __init__(
    self,
    train: cls_readers.ClassificationSet,
    test: cls_readers.ClassificationSet,
    val: cls_readers.ClassificationSet | None,
    val_proportion: float,
    settings: linear_probe.ProbeSettings,
  ):
    self.train, self.test, self.val = train, test, val
    self.val_proportion, self.settings = val_proportion, settings

  def _features(
    self, embedder: Embedder, params: Any, data: cls_readers.ClassificationSet, split: str
  ):
    desc = f"{self.test.name} {split} images"
    return embedder.images(params, data.images, len(data.labels), desc), data.labels

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    train = self._features(embedder, params, self.train, "train")
    test = self._features(embedder, params, self.test, "test")
    val = None
    if self.val is not None:
      val = self._features(embedder, params, self.val, "val")
    elif self.val_proportion > 0:
      train, val = linear_probe.split_validation(*train, self.val_proportion, self.settings.seed)
    metrics = linear_probe.linear_probe(train, test, val, self.settings)
    headline = ["lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"]
    return [Result(self.name, self.test.name, metrics, headline)]


# ---------------------------------------------------------------------- compositional

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


def _sugarcrepe(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  return compositional.pairwise_accuracy(scores, data.groups["subset"])


def _vg_relation(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  excluded = compositional.load_list("aro_vg_relation_excluded.txt")
  return compositional.aro_vg_accuracy(scores, data.groups["group"], exclude=excluded)


def _vg_attribution(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  return compositional.aro_vg_accuracy(scores, data.groups["group"], min_count=25)


def _order(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  return {"precision@1": compositional.order_precision(scores)}


def _winoground(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  metrics = compositional.winoground_scores(scores)
  tags = data.groups["tag"]
  for tag in sorted(set(tags.tolist()) - {""}):
    found = compositional.winoground_scores(scores[tags == tag])
    metrics.update({f"{tag}/{k}": v for k, v in found.items()})
  return metrics


def _crepe(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
  ranks = compositional.positive_ranks(scores)
  metrics = compositional.crepe_metrics(ranks)
  subsets = data.groups["subset"]
  for subset in sorted(set(subsets.tolist())):
    found = compositional.crepe_metrics(ranks[subsets == subset])
    metrics.update({f"{subset}/{k}": v for k, v in found.items()})
  return metrics


def _svo(threshold: float | None) -> ScoreFn:
  def score(scores: np.ndarray, data: MatchingSet) -> dict[str, float]:
    g = data.groups
    return compositional.svo_metrics(
      scores[:, 0, 0], scores[:, 1, 0], g["pos_pair"], g["neg_pair"], g["kind"], threshold
    )

  return score


# ----------------------------------------------------------------------------- factory


def _templates(spec: readers.DatasetSpec, data: cls_readers.ClassificationSet, default: str):
  if spec.get("templates"):
    return cls_readers.read_templates(spec.get("templates"))
  if data.templates:
    return data.templates
  if default:
    return cls_readers.read_templates(default)
  return compositional.load_list("imagenet_templates.txt")


def _one(specs: list[readers.DatasetSpec], task: str) -> readers.DatasetSpec:
  if len(specs) != 1:
    raise ValueError(f"--data.{task} takes one dataset, got {len(specs)}")
  return specs[0]


def create_tasks(
  names: Sequence[str],
  eval_config: ml_collections.ConfigDict,
  heldout: Callable[[], readers.RetrievalSet] | None = None,
  matcher: rerank.Matcher | None = None,
  agent_masking: Callable[[], Task] | None = None,
) -> list[Task]:
  """Reads every dataset the named tasks need, from `config.eval.data.<task>`.

  `agent_masking` builds that task (agent_report.create_task over the method's
  agent_logits and the held-out set): it needs more than the eval config.

  `matcher` (a method's ITM head) adds re-ranked retrieval and ITM-scored compositional
  results when config.eval.rerank_k > 0."""
  tasks: list[Task] = []
  ks = tuple(eval_config.recall_ks)
  rerank_k = eval_config.rerank_k
  matcher = matcher if rerank_k > 0 else None
  for name in names:
    if name not in TASKS:
      raise ValueError(f"unknown evaluation task {name!r}; known: {', '.join(TASKS)}")
    if name == "heldout":
      if heldout is None:
        raise ValueError("the heldout task needs the run's eval shards")
      tasks.append(RetrievalTask(heldout(), ks, True, matcher, rerank_k))
      continue
    if name == "agent_masking":
      if agent_masking is None:
        raise ValueError("the agent_masking task needs the method's agent_logits")
      tasks.append(agent_masking())
      continue
    text = eval_config.data[name]
    if not text:
      raise ValueError(f"task {name} needs a dataset: --data.{name}=<path>[,key=value...]")
    specs = readers.parse_specs(text, f"--data.{name}", OPTIONS[name])
    if name == "zeroshot_retrieval":
      tasks.extend(
        RetrievalTask(
          readers.read_retrieval(s, eval_config.max_captions), ks, False, matcher, rerank_k
        )
        for s in specs
      )
    elif name == "zeroshot_classification":
      for spec in specs:
        data = cls_readers.read_classification(spec, spec.get("split", "test"))
        tasks.append(
          ZeroShotClassificationTask(data, _templates(spec, data, eval_config.templates))
        )
    elif name == "linear_probe":
      for spec in specs:
        tasks.append(_linear_probe_task(spec, eval_config.linear_probe))
    else:
      spec = _one(specs, name)
      tasks.append(_matching_task(name, spec, eval_config, matcher))
  return tasks


def _linear_probe_task(spec: readers.DatasetSpec, lp: ml_collections.ConfigDict) -> Task:
  def read(split: str) -> cls_readers.ClassificationSet:
    return cls_readers.read_classification(spec, split, require_split=True)

  train, test = read(spec.get("train_split", "train")), read(spec.get("split", "test"))
  val = read(spec.get("val_split")) if spec.get("val_split") else None
  settings = linear_probe.ProbeSettings(
    lr=lp.lr, epochs=lp.epochs, batch_size=lp.batch_size, seed=lp.seed
  )
  return LinearProbeTask(train, test, val, lp.val_proportion, settings)


def _matching_task(
  name: str,
  spec: readers.DatasetSpec,
  eval_config: ml_collections.ConfigDict,
  matcher: rerank.Matcher | None = None,
) -> Task:
  images = spec.get("images")
  if name == "sugarcrepe":
    data = creaders.read_sugarcrepe(spec.path, images)
    headline = [*creaders.SUGARCREPE_SUBSETS, "mean"]
    return MatchingTask(name, "sugar_crepe", {"": (data, _sugarcrepe)}, headline, matcher=matcher)
  if name == "aro":
    found = creaders.read_aro(spec.path, spec.options)
    score_fns = {
      "vg_relation": _vg_relation,
      "vg_attribution": _vg_attribution,
      "coco_order": _order,
      "flickr30k_order": _order,
    }
    sets = {k: (v, score_fns[k]) for k, v in found.items()}
    headline = [
      "vg_relation/macro_accuracy",
      "vg_attribution/macro_accuracy",
      "coco_order/precision@1",
      "flickr30k_order/precision@1",
    ]
    return MatchingTask(name, "aro", sets, headline, matcher=matcher)
  if name == "winoground":
    data = creaders.read_winoground(spec.path, images)
    return MatchingTask(
      name,
      "winoground",
      {"": (data, _winoground)},
      ["text_score", "image_score", "group_score"],
      matcher=matcher,
    )
  if name == "crepe":
    folders = (
      [f for f in images.split(os.pathsep) if f] if images else [os.path.join(spec.path, "images")]
    )
    data = creaders.read_crepe(spec.path, folders)
    return MatchingTask(
      name,
      "crepe",
      {"": (data, _crepe)},
      ["R@1", "R@3", "R@5", "R@10", "mean_rank"],
      matcher=matcher,
    )
  if name == "svo":
    data, dropped = creaders.read_svo(spec.path, images)
    headline = [
      "all/accuracy",
      "all/pos_accuracy",
      "all/neg_accuracy",
      "subj/accuracy",
      "verb/accuracy",
      "obj/accuracy",
      "all/pairwise_accuracy",
    ]
    sets = {"": (data, _svo(eval_config.svo_threshold))}
    # A cosine threshold means nothing for ITM logits: those take the oracle threshold.
    return MatchingTask(
      name,
      "svo_probes",
      sets,
      headline,
      {"num_rows_dropped": float(dropped)},
      matcher=matcher,
      itm_score_fns={"": _svo(None)},
    )
  raise ValueError(f"unknown compositional task {name!r}")
