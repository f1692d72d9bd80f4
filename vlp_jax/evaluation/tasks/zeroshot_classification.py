"""Zero-shot classification: class prompts embedded and averaged into a classifier
(CLIP's), top-1 / top-5 / mean per-class recall (CLIP_benchmark's)."""

from __future__ import annotations

from typing import Any

import ml_collections

from vlp_jax.evaluation import classification, compositional, readers
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef
from vlp_jax.input_pipeline import classification_readers as cls_readers
from vlp_jax.input_pipeline.image_sources import DataError

NAME = "zeroshot_classification"
# Options of a config.eval.data.zeroshot_classification spec (readers.parse_specs).
OPTIONS = ("split", "name", "classnames", "templates", "data_dir", "image_key", "label_key")


class ZeroShotClassificationTask(Task):
  name = NAME

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


def _templates(spec: readers.DatasetSpec, data: cls_readers.ClassificationSet, default: str):
  """The spec's templates=, else the dataset's own, else the task's templates option, else
  CLIP's 80 ImageNet prompts."""
  if spec.get("templates"):
    return cls_readers.read_templates(spec.get("templates"))
  if data.templates:
    return data.templates
  if default:
    return cls_readers.read_templates(default)
  return compositional.load_list("imagenet_templates.txt")


def create(ctx: Context) -> list[Task]:
  tasks: list[Task] = []
  for spec in ctx.specs(NAME, OPTIONS):
    data = cls_readers.read_classification(spec, spec.get("split", "test"))
    tasks.append(
      ZeroShotClassificationTask(data, _templates(spec, data, ctx.config.eval[NAME].templates))
    )
  return tasks


def _options() -> ml_collections.ConfigDict:
  """config.eval.zeroshot_classification."""
  options = ml_collections.ConfigDict()
  # Prompt file, "{c}" per line, for a dataset whose spec has no templates= and that has
  # none of its own; "": CLIP's 80 ImageNet prompts.
  options.templates = ""
  return options


TASK = TaskDef(NAME, ("embed_image", "embed_text"), create, options=_options)
