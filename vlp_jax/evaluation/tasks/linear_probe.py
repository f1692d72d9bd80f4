"""Linear probe: a logistic-regression head trained on frozen image embeddings
(CLIP_benchmark's recipe, config.eval.linear_probe), scored on the test split."""

from __future__ import annotations

from typing import Any

import ml_collections

from vlp_jax.config_lib import at_least, in_range, positive
from vlp_jax.evaluation import linear_probe, readers
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef
from vlp_jax.input_pipeline import classification_readers as cls_readers

NAME = "linear_probe"
# Options of a config.eval.data.linear_probe spec (readers.parse_specs).
OPTIONS = ("train_split", "val_split", "split", "name", "data_dir", "image_key", "label_key")


class LinearProbeTask(Task):
  name = NAME

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


def _task(spec: readers.DatasetSpec, lp: ml_collections.ConfigDict) -> Task:
  def read(split: str) -> cls_readers.ClassificationSet:
    return cls_readers.read_classification(spec, split, require_split=True)

  train, test = read(spec.get("train_split", "train")), read(spec.get("split", "test"))
  val = read(spec.get("val_split")) if spec.get("val_split") else None
  settings = linear_probe.ProbeSettings(
    lr=lp.lr, epochs=lp.epochs, batch_size=lp.batch_size, seed=lp.seed
  )
  return LinearProbeTask(train, test, val, lp.val_proportion, settings)


def create(ctx: Context) -> list[Task]:
  return [_task(spec, ctx.config.eval.linear_probe) for spec in ctx.specs(NAME, OPTIONS)]


def _options() -> ml_collections.ConfigDict:
  """config.eval.linear_probe: CLIP_benchmark's probe recipe."""
  options = ml_collections.ConfigDict()
  options.lr = 0.1  # AdamW's learning rate (cosine schedule).
  options.epochs = 10  # Passes over the training embeddings.
  options.batch_size = 64  # Embeddings per probe step.
  options.seed = 0  # Seeds the head's initialisation, shuffling and the validation split.
  # Share of the training split held out to search the weight decay when the dataset
  # has no validation split (val_split=); 0: no search, weight decay 0.
  options.val_proportion = 0.2
  return options


TASK = TaskDef(
  NAME,
  ("embed_image",),
  create,
  needs_what="image embedding",
  options=_options,
  rules={
    "lr": positive(),
    "epochs": at_least(1),
    "batch_size": at_least(1),
    "seed": at_least(0),
    "val_proportion": in_range(0, 1, include_high=False),  # 0: no search.
  },
)
