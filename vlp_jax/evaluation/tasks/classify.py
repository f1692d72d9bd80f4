"""A fine-tuned classifier: the method's "class_logits" (params, images) -> (B, C) on an
image-classification set (config.eval.data.classify_finetuned, read as the linear
probe's, `split=` default "val"); top-1 / top-5 / mean per-class recall."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from vlp_jax.evaluation import classification
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef
from vlp_jax.input_pipeline import classification_readers as cls_readers
from vlp_jax.input_pipeline import finetune_data
from vlp_jax.input_pipeline.image_sources import DataError

NAME = "classify_finetuned"


class ClassifyTask(Task):
  """Top-1 / top-5 of a fine-tuned classifier (the images preprocessed as the Embedder's
  evaluation transform)."""

  name = NAME

  def __init__(self, data: cls_readers.ClassificationSet, class_logits: Callable[..., jax.Array]):
    self.data, self.class_logits = data, class_logits
    self._embedders: dict[int, Embedder] = {}

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    if id(embedder) not in self._embedders:
      # The embedder's batching and image loading, with the logits as the "embedding".
      self._embedders[id(embedder)] = Embedder(
        {"embed_image": self.class_logits},
        embedder.mesh,
        embedder.tokenizer,
        batch_size=embedder.batch_size,
        image_size=embedder.image_size,
        read_threads=embedder.read_threads,
        show_progress=embedder.show_progress,
      )
    data = self.data
    logits = self._embedders[id(embedder)].images(
      params, data.images, len(data.labels), f"{data.name} images"
    )
    num_classes = logits.shape[1]
    if len(data.classnames) != num_classes:
      raise DataError(
        f"{data.name}: {len(data.classnames)} classes, the model's head has {num_classes}"
      )
    metrics = classification.classification_metrics(logits, data.labels, num_classes)
    metrics["num_images"] = float(len(data.labels))
    return [Result(self.name, data.name, metrics, ["acc1", "acc5", "mean_per_class_recall"])]


def create(ctx: Context) -> list[Task]:

  text = ctx.dataset(NAME, " or builtin")
  data = finetune_data.read_classification_spec(text, False, f"--data.{NAME}")
  return [ClassifyTask(data, ctx.predict_fns["class_logits"])]


TASK = TaskDef(NAME, ("class_logits",), create, needs_what="classification head")
