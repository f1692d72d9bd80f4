"""Evaluation of fine-tuned models (VLC's downstream tasks) with each benchmark's metric.

Tasks (config.eval.tasks; datasets in config.eval.data.<task>, "builtin" for the
generated sets of input_pipeline/builtin_tasks.py sized by config.finetune.builtin):
- vqa: VQAv2 questions (`QUESTIONS_JSON,annotations=ANNOTATIONS_JSON,images=DIR`); the
  method's "vqa_logits" (params, images, tokens) -> (B, answers); the argmax answer
  scored by the official metric (evaluation/vqa.py) overall, per answer type and per
  question type. Questions without annotations (test-dev) are only answered.
- nlvr2: an NLVR2 jsonl (`dev.json,images=DIR`); "nlvr2_logits" (params, left, right,
  tokens) -> (B, 2); accuracy and consistency as NLVR2's script (evaluation/nlvr2.py).
- classify_finetuned: an image-classification set (classification_readers.py, as the
  linear probe's, `split=` default "val"); "class_logits" (params, images) -> (B, C);
  top-1 / top-5 / mean per-class recall.
- itm_retrieval: retrieval ranked by a matching head alone ("match_image" +
  "match_score", evaluation/rerank.py) for models without embeddings (single-stream):
  every (image, caption) pair is scored once, as VLC's compute_irtr_recall does; dataset
  "heldout" (the run's eval shards) or a zeroshot_retrieval spec.

Batches go through the mesh as the Embedder's do: the same static global batch, padding
rows marked -1, outputs gathered to every host and put back in order by row. Beside the
result JSON (report.py), each task writes the benchmark's own files into
`<out>/step_<N>/<dataset>_<task>/`: VQA the official accuracy dict and the test-dev
style `[{"question_id", "answer"}]` results; NLVR2 its accuracy dict and the
"identifier,True|False" predictions its script reads.

The dataset readers here are shared with methods/vlc_tasks.py (training data, the answer
vocabulary), so that training and evaluation read a spec the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax import sharding
from vlp_jax.evaluation import classification, nlvr2, readers, rerank, vqa
from vlp_jax.evaluation import classification_readers as cls_readers
from vlp_jax.evaluation.embedding import DataError, Embedder
from vlp_jax.evaluation.retrieval import retrieval_metrics
from vlp_jax.evaluation.tasks import Result, Task
from vlp_jax.input_pipeline import builtin_tasks, task_data

BUILTIN = "builtin"  # A dataset spec naming the generated set.
HELDOUT = "heldout"  # itm_retrieval: the run's own eval shards.
# The prediction functions each task needs (merged into tasks.TASK_NEEDS).
TASK_NEEDS: dict[str, tuple[str, ...]] = {
  "vqa": ("vqa_logits",),
  "nlvr2": ("nlvr2_logits",),
  "classify_finetuned": ("class_logits",),
  "itm_retrieval": rerank.MATCH_FNS,
}
TASKS = tuple(TASK_NEEDS)
# Options of each task's dataset spec (readers.parse_specs).
OPTIONS = {
  "vqa": ("annotations", "images", "name"),
  "nlvr2": ("images", "name"),
  "classify_finetuned": (
    "split",
    "train_split",
    "name",
    "data_dir",
    "image_key",
    "label_key",
    "classnames",
  ),
  "itm_retrieval": ("images", "split", "name"),
}


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class BuiltinSets:
  """Sizes of the generated VQA / NLVR2 sets (config.finetune.builtin)."""

  cache_dir: str
  num_train: int
  num_eval: int
  image_size: int
  seed: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> BuiltinSets:
    b = config.finetune.builtin
    return cls(config.data.cache_dir, b.num_train, b.num_eval, b.image_size, b.seed)


def _spec(text: str, task: str, flag: str) -> readers.DatasetSpec:
  specs = readers.parse_specs(text, flag, OPTIONS[task])
  if len(specs) != 1:
    raise ValueError(f"{flag} takes one dataset, got {len(specs)}")
  return specs[0]


@functools.lru_cache(maxsize=8)  # The method and the evaluation read the same files.
def read_vqa_spec(
  text: str, train: bool, builtin: BuiltinSets, flag: str = "--data.vqa"
) -> tuple[str, tuple[task_data.VqaExample, ...]]:
  """(dataset name, examples) of a VQA spec (several joined by ";", e.g. VQAv2's train
  and val for training); "builtin": the generated set's train or val split."""
  if text == BUILTIN:
    sets = builtin_tasks.ensure_builtin_vqa(
      builtin.cache_dir or None,
      num_train=builtin.num_train,
      num_val=builtin.num_eval,
      image_size=builtin.image_size,
      seed=builtin.seed,
    )
    return "builtin-vqa", tuple(sets.examples("train" if train else "val"))
  names, examples = [], []
  for spec in readers.parse_specs(text, flag, OPTIONS["vqa"]):  # ";" joins splits.
    if not spec.get("images"):
      raise ValueError(f"{flag}: {spec.text!r} needs images=<COCO image root>")
    annotations = spec.get("annotations") or None
    examples += task_data.read_vqa(spec.path, annotations, spec.get("images"))
    names.append(spec.get("name") or readers.stem(spec.path))
  if not names:
    raise ValueError(f"{flag}: no dataset in {text!r}")
  return "+".join(names), tuple(examples)


@functools.lru_cache(maxsize=8)
def read_nlvr2_spec(
  text: str, train: bool, builtin: BuiltinSets, flag: str = "--data.nlvr2"
) -> tuple[str, tuple[task_data.Nlvr2Example, ...]]:
  """(dataset name, examples) of an NLVR2 spec (several joined by ";"); "builtin": the
  generated train or dev split."""
  if text == BUILTIN:
    sets = builtin_tasks.ensure_builtin_nlvr2(
      builtin.cache_dir or None,
      num_train=builtin.num_train,
      num_dev=builtin.num_eval,
      image_size=builtin.image_size,
      seed=builtin.seed,
    )
    return "builtin-nlvr2", tuple(sets.examples("train" if train else "dev"))
  names, examples = [], []
  for spec in readers.parse_specs(text, flag, OPTIONS["nlvr2"]):  # ";" joins files.
    if not spec.get("images"):
      raise ValueError(f"{flag}: {spec.text!r} needs images=<image root>")
    examples += task_data.read_nlvr2(spec.path, spec.get("images"))
    names.append(spec.get("name") or readers.stem(spec.path))
  if not names:
    raise ValueError(f"{flag}: no dataset in {text!r}")
  return "+".join(names), tuple(examples)


@functools.lru_cache(maxsize=4)
def read_classification_spec(
  text: str, train: bool, flag: str = "--data.classify_finetuned"
) -> cls_readers.ClassificationSet:
  """A classification spec's training split (`train_split=`, default "train") or its
  evaluation split (`split=`, default "val")."""
  spec = _spec(text, "classify_finetuned", flag)
  split = spec.get("train_split", "train") if train else spec.get("split", "val")
  return cls_readers.read_classification(spec, split, require_split=True)


@functools.lru_cache(maxsize=4)
def answer_vocab(
  answers_file: str, train_text: str, min_count: int, builtin: BuiltinSets
) -> tuple[str, ...]:
  """The VQA answers (head outputs, in order): `answers_file` (one per line) or ViLT's
  vocabulary built from the training annotations (answers that are the most common
  answer of at least `min_count` questions)."""
  if answers_file:
    return tuple(vqa.read_answer_vocab(answers_file))
  _, train = read_vqa_spec(train_text, True, builtin, "config.finetune.train")
  answers = vqa.build_answer_vocab(train, min_count)
  if not answers:
    raise ValueError(
      f"config.finetune.min_answer_count={min_count}: no answer of {train_text!r} is that common"
    )
  return tuple(answers)


def config_answer_vocab(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """answer_vocab of a run's config.finetune."""
  tune = config.finetune
  return answer_vocab(
    tune.answers, tune.train, tune.min_answer_count, BuiltinSets.from_config(config)
  )


# ----------------------------------------------------------------------------- running


def _write_json(value: Any) -> Callable[[str], None]:
  def write(path: str) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
      json.dump(value, f, indent=2)
    os.replace(f"{path}.tmp", path)

  return write


class _BatchRunner:
  """Runs `fn(params, *fields)` over host batches on the mesh and returns its outputs
  by row on every host (rows < 0: padding)."""

  def __init__(self, fn: Callable[..., jax.Array], fields: Sequence[str]):
    self.fn, self.fields = fn, tuple(fields)
    self._jitted: dict[Any, Any] = {}

  def _compiled(self, mesh: Any) -> Any:
    if mesh not in self._jitted:
      fn, fields = self.fn, self.fields

      def run(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"out": fn(params, *(batch[f] for f in fields)), "row": batch["row"]}

      self._jitted[mesh] = jax.jit(run, out_shardings=sharding.batch_sharding(mesh))
    return self._jitted[mesh]

  def run(
    self, embedder: Embedder, params: Any, batches: Iterable[dict[str, np.ndarray]], count: int
  ) -> np.ndarray:
    run = self._compiled(embedder.mesh)
    outputs = []
    for batch in batches:
      # Dispatch is asynchronous: the pipeline prepares the next batch meanwhile.
      inputs = {f: batch[f] for f in (*self.fields, "row")}
      outputs.append(run(params, sharding.host_to_global(inputs, embedder.mesh)))
    if not outputs:
      raise ValueError("no batches to evaluate")
    gathered = multihost_utils.process_allgather(outputs, tiled=True)
    values = np.concatenate([np.asarray(o["out"]) for o in gathered])
    rows = np.concatenate([np.asarray(o["row"]) for o in gathered])
    result = np.zeros((count, *values.shape[1:]), values.dtype)
    result[rows[rows >= 0]] = values[rows >= 0]
    return result


def _with_rows(batches: Iterable[dict[str, np.ndarray]], row_of: Callable[[dict], np.ndarray]):
  for batch in batches:
    yield {**batch, "row": row_of(batch).astype(np.int32)}


# ----------------------------------------------------------------------------- tasks


class VqaTask(Task):
  """VQAv2's official accuracy of the argmax answer."""

  name = "vqa"

  def __init__(
    self,
    dataset: str,
    examples: Sequence[task_data.VqaExample],
    answers: Sequence[str],
    vqa_logits: Callable[..., jax.Array],
  ):
    self.dataset, self.examples, self.answers = dataset, list(examples), list(answers)
    self._index = {e.question_id: i for i, e in enumerate(self.examples)}
    if len(self._index) != len(self.examples):
      raise DataError(f"{dataset}: question ids repeat")

    def answer(params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
      return jax.numpy.argmax(vqa_logits(params, images, tokens), axis=-1).astype(jax.numpy.int32)

    self._runner = _BatchRunner(answer, ("image", "tokens"))

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    batches = task_data.create_vqa_dataset(
      self.examples,
      embedder.tokenizer,
      self.answers,
      image_size=embedder.image_size,
      batch_size=embedder.local_batch,
      seed=0,
      train=False,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      read_threads=embedder.read_threads,
    )
    unreadable = np.zeros(len(self.examples), bool)

    def row_of(batch: dict) -> np.ndarray:
      rows = np.asarray([self._index.get(int(q), -1) for q in batch["question_id"]])
      unreadable[rows[(rows >= 0) & ~batch["valid"]]] = True
      return rows

    chosen = self._runner.run(embedder, params, _with_rows(batches, row_of), len(self.examples))
    unreadable = multihost_utils.process_allgather(unreadable).any(axis=0)
    # A question whose image could not be read gets no answer: wrong, but still counted.
    predictions = {
      e.question_id: "" if unreadable[i] else self.answers[chosen[i]]
      for i, e in enumerate(self.examples)
    }
    metrics: dict[str, float] = {
      "num_questions": float(len(self.examples)),
      "num_unreadable": float(unreadable.sum()),
    }
    files = {"vqa_results.json": _write_json(_results_list(predictions))}
    scored = [e.question_id for e in self.examples if e.answers]
    headline = ["num_questions"]
    if scored:
      official = vqa.evaluate_vqa(predictions, self.examples, question_ids=scored)
      # Fractions, as every other result (the summary prints percent); the official
      # file keeps the script's percentages.
      metrics["overall"] = official["overall"] / 100
      for group in ("perAnswerType", "perQuestionType"):
        metrics.update({f"{group}/{k}": v / 100 for k, v in official[group].items()})
      metrics["num_scored"] = float(len(scored))
      files["vqa_accuracy.json"] = _write_json(
        {k: official[k] for k in ("overall", "perAnswerType", "perQuestionType")}
      )
      types = [f"perAnswerType/{t}" for t in ("yes/no", "number", "other")]
      headline = ["overall", *[t for t in types if t in metrics], "num_questions"]
    return [Result(self.name, self.dataset, metrics, headline, files=files)]


def _results_list(predictions: Mapping[int, str]) -> list[dict[str, Any]]:
  return [{"question_id": int(q), "answer": str(a)} for q, a in predictions.items()]


class Nlvr2Task(Task):
  """NLVR2's accuracy and consistency."""

  name = "nlvr2"

  def __init__(
    self,
    dataset: str,
    examples: Sequence[task_data.Nlvr2Example],
    nlvr2_logits: Callable[..., jax.Array],
  ):
    self.dataset, self.examples = dataset, list(examples)

    def holds(params: Any, left: jax.Array, right: jax.Array, tokens: jax.Array) -> jax.Array:
      return jax.numpy.argmax(nlvr2_logits(params, left, right, tokens), axis=-1).astype(
        jax.numpy.int32
      )

    self._runner = _BatchRunner(holds, ("image", "image2", "tokens"))

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    batches = task_data.create_nlvr2_dataset(
      self.examples,
      embedder.tokenizer,
      image_size=embedder.image_size,
      batch_size=embedder.local_batch,
      seed=0,
      train=False,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      read_threads=embedder.read_threads,
    )
    unreadable = np.zeros(len(self.examples), bool)

    def row_of(batch: dict) -> np.ndarray:
      rows = np.asarray(batch["index"])
      unreadable[rows[(rows >= 0) & ~batch["valid"]]] = True
      return rows

    holds = self._runner.run(embedder, params, _with_rows(batches, row_of), len(self.examples))
    unreadable = multihost_utils.process_allgather(unreadable).any(axis=0)
    # An unreadable pair counts as wrong: the opposite of its label.
    predictions = {
      e.identifier: (not e.label) if unreadable[i] else bool(holds[i])
      for i, e in enumerate(self.examples)
    }
    official = nlvr2.evaluate_nlvr2(predictions, self.examples)
    metrics = {
      "accuracy": official["accuracy"] / 100,
      "consistency": official["consistency"] / 100,
      "num_examples": float(official["num_examples"]),
      "num_sentences": float(official["num_sentences"]),
      "num_unreadable": float(unreadable.sum()),
    }

    def write_predictions(path: str) -> None:
      nlvr2.write_nlvr2_predictions(path, predictions)

    files = {
      "nlvr2_accuracy.json": _write_json(official),
      "nlvr2_predictions.csv": write_predictions,
    }
    headline = ["accuracy", "consistency", "num_examples"]
    return [Result(self.name, self.dataset, metrics, headline, files=files)]


class ClassifyTask(Task):
  """Top-1 / top-5 of a fine-tuned classifier (the images preprocessed as the Embedder's
  evaluation transform)."""

  name = "classify_finetuned"

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


class ItmRetrievalTask(Task):
  """Image and text retrieval ranked by the matching head over every pair."""

  name = "itm_retrieval"

  def __init__(self, data: readers.RetrievalSet, predict_fns: Mapping[str, Any], ks: Sequence[int]):
    self.data, self.predict_fns, self.ks = data, dict(predict_fns), tuple(ks)
    self._matchers: dict[int, rerank.Matcher] = {}

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    if id(embedder) not in self._matchers:
      self._matchers[id(embedder)] = rerank.Matcher(self.predict_fns, embedder)
    matcher, data = self._matchers[id(embedder)], self.data
    texts = [c for captions in data.captions for c in captions]
    text_to_image = np.repeat(np.arange(len(data.captions)), [len(c) for c in data.captions])
    num_images, num_texts = len(data.images), len(texts)
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
    headline = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in self.ks]
    return [Result(self.name, data.name, metrics, headline)]


# ----------------------------------------------------------------------------- factory


def create_tasks(
  names: Sequence[str],
  config: ml_collections.ConfigDict,
  predict_fns: Mapping[str, Any],
  heldout: Callable[[], readers.RetrievalSet] | None = None,
) -> list[Task]:
  """The fine-tuning tasks among `names`, their data read now (config.eval.data.<task>)."""
  tasks: list[Task] = []
  builtin = BuiltinSets.from_config(config)
  for name in names:
    text = config.eval.data[name]
    flag = f"--data.{name}"
    if not text:
      raise ValueError(f"task {name} needs a dataset: {flag}=<path>[,key=value...] or builtin")
    missing = [fn for fn in TASK_NEEDS[name] if fn not in predict_fns]
    if missing:
      raise ValueError(f"evaluation task {name!r} needs {', '.join(missing)}")
    if name == "vqa":
      dataset, examples = read_vqa_spec(text, False, builtin, flag)
      answers = config_answer_vocab(config)
      tasks.append(VqaTask(dataset, examples, answers, predict_fns["vqa_logits"]))
    elif name == "nlvr2":
      dataset, examples = read_nlvr2_spec(text, False, builtin, flag)
      tasks.append(Nlvr2Task(dataset, examples, predict_fns["nlvr2_logits"]))
    elif name == "classify_finetuned":
      tasks.append(
        ClassifyTask(read_classification_spec(text, False, flag), predict_fns["class_logits"])
      )
    elif name == "itm_retrieval":
      if text == HELDOUT:
        if heldout is None:
          raise ValueError(f"{flag}=heldout needs the run's eval shards")
        data = heldout()
      else:
        data = readers.read_retrieval(_spec(text, name, flag), config.eval.max_captions)
      tasks.append(ItmRetrievalTask(data, predict_fns, config.eval.recall_ks))
    else:
      raise ValueError(f"unknown fine-tuning task {name!r}; known: {', '.join(TASKS)}")
  return tasks
