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
- itm_retrieval: retrieval ranked by a matching head ("match_image" + "match_score",
  evaluation/rerank.py) for models without embeddings (single-stream): every (image,
  caption) pair is scored once, as VLC's compute_irtr_recall does, or, with a dual
  encoder named by config.finetune.shortlist (a CLIP run or converted directory), only
  each query's shortlist_k nearest by that CLIP's embeddings, a true match outside the
  shortlist counting as a miss; dataset "heldout" (the run's eval shards) or a
  zeroshot_retrieval spec.

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
from flax import traverse_util
from jax.experimental import multihost_utils

from vlp_jax import peft, preemption, sharding
from vlp_jax.config_lib import ConfigError
from vlp_jax.evaluation import classification, nlvr2, readers, rerank, vqa
from vlp_jax.evaluation import classification_readers as cls_readers
from vlp_jax.evaluation.embedding import DataError, Embedder
from vlp_jax.evaluation.retrieval import retrieval_metrics
from vlp_jax.evaluation.tasks import Result, Task
from vlp_jax.input_pipeline import builtin_tasks, image_files, pipeline, task_data, tokenizers
from vlp_jax.models import clip

BUILTIN = "builtin"  # A dataset spec naming the generated set.
SHORTLIST_KEY = "config.finetune.shortlist"
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
  nlvr2_statements: str = ""  # Comma list of builtin_tasks.STATEMENT_KINDS; "": all.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> BuiltinSets:
    b = config.finetune.builtin
    return cls(
      config.data.cache_dir, b.num_train, b.num_eval, b.image_size, b.seed, b.nlvr2_statements
    )

  @property
  def nlvr2_kinds(self) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in self.nlvr2_statements.split(",") if k.strip())
    unknown = [k for k in kinds if k not in builtin_tasks.STATEMENT_KINDS]
    if unknown:
      raise ValueError(
        f"config.finetune.builtin.nlvr2_statements: {unknown} are not among "
        f"{list(builtin_tasks.STATEMENT_KINDS)}"
      )
    return kinds or builtin_tasks.STATEMENT_KINDS


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
      kinds=builtin.nlvr2_kinds,
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


# ----------------------------------------------------------------------------- shortlist

# Runs whose parameters are a CLIP (models/clip.py) with its two embeddings.
DUAL_ENCODER_METHODS = ("contrastive", "negclip")


@dataclasses.dataclass(frozen=True)
class DualEncoder:
  """The CLIP that shortlists retrieval candidates for a matching head."""

  path: str
  model: clip.CLIP
  params: Any  # Host arrays.
  tokenizer: tokenizers.Tokenizer

  def embed(
    self, embedder: Embedder, images: Sequence[Any], texts: Sequence[str], desc: str = ""
  ) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) unit embeddings, batched on `embedder`'s mesh at this CLIP's own
    image size and with its own tokenizer."""
    clip_embedder = Embedder(
      clip.embedding_fns(self.model),
      embedder.mesh,
      self.tokenizer,
      batch_size=embedder.batch_size,
      image_size=self.model.visual.image_size,
      read_threads=embedder.read_threads,
      show_progress=embedder.show_progress,
    )
    replicated = sharding.replicated(embedder.mesh)
    params = sharding.host_tree_to_global(
      self.params, jax.tree.map(lambda _: replicated, self.params)
    )
    desc = f"{desc} shortlist".strip()
    image_emb = clip_embedder.images(params, images, len(images), f"{desc} images")
    return image_emb, clip_embedder.texts(params, texts, f"{desc} texts")


def load_dual_encoder(path: str, key: str = SHORTLIST_KEY) -> DualEncoder:
  """The CLIP of a contrastive run's workdir (its newest checkpoint, config.json and
  tokenizer.json) or of a converted directory (python -m vlp_jax.weights.convert);
  a ConfigError naming `key` when it is neither or its parameters do not fit."""
  from vlp_jax.weights import convert  # Orbax and the importers: only when shortlisting.

  if not os.path.isdir(path):
    raise ConfigError(
      f"{key}: {path!r} is not a directory (a CLIP run's workdir or a converted CLIP)"
    )
  try:
    params, info = convert.read_params(path)
  except (ValueError, OSError) as e:
    raise ConfigError(f"{key}: {e}") from e
  run = info.get("config")
  method = run.get("method", "contrastive") if run else "contrastive"
  fields = run.get("model") if run else info.get("model")
  if method not in DUAL_ENCODER_METHODS or not isinstance(fields, dict) or "text" not in fields:
    raise ConfigError(
      f"{key}: {path} is not a dual encoder (a run of {', '.join(DUAL_ENCODER_METHODS)} "
      f"or a converted CLIP with a text tower); it is a {method!r} model"
    )
  try:
    vocab = convert.run_tokenizer(info)
    tokenizer = tokenizers.create_tokenizer(
      vocab["kind"],
      vocab["vocab_file"] or "",
      fields["text"]["context_length"],
      vocab["lower_case"],
    )
    if run:  # As the run's own method builds it (SigLIP's bias, PEFT factors).
      from configs.common import base_config  # configs/ lies beside eval.py, not in vlp_jax.

      base = base_config()  # Gives fields a run of an older version lacks their defaults.
      convert.update_model_config(base.model, fields)
      convert.update_model_config(base.peft, run.get("peft", {}))
      model = clip.create_model(
        base.model,
        tokenizer.vocab_size,
        tokenizer.pad_id,
        loss_kind=run["loss"]["kind"],
        tuning=peft.tuning_from_config(base.peft),
      )
    else:
      model = convert.model_from_fields(fields)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    raise ConfigError(f"{key}: cannot rebuild the CLIP of {path}: {e!r}") from e
  size, length = model.visual.image_size, tokenizer.context_length
  wanted = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, size, size, 3), np.uint8),
    jax.ShapeDtypeStruct((1, length), np.int32),
  )["params"]
  want = traverse_util.flatten_dict(wanted, sep="/")
  have = traverse_util.flatten_dict(params, sep="/")
  problems = [k for k in want if k not in have or tuple(have[k].shape) != want[k].shape]
  if problems:
    raise ConfigError(
      f"{key}: the parameters of {path} do not fit the CLIP its config describes "
      f"({', '.join(problems[:5])}{', ...' if len(problems) > 5 else ''})"
    )
  params = traverse_util.unflatten_dict({k: have[k] for k in want}, sep="/")
  logging.info("Retrieval shortlists come from the CLIP %s", path)
  return DualEncoder(path, model, params, tokenizer)


# ----------------------------------------------------------------------------- running


def _unreadable_files(
  dataset: str, paths: Sequence[str], rows: int, of: int
) -> dict[str, Callable[[str], None]]:
  """{image_files.SKIP_LIST_FILE: writer} listing which of `paths` (the images of `rows`
  of `of` rows scored as wrong) cannot be read, "<path>\t<why>" lines; {} if none."""
  if not rows:
    return {}
  lines = []
  for path in dict.fromkeys(paths):  # Read again, as the dataset did, to say why.
    try:
      task_data.load_image(path, 8)
    except (OSError, pipeline.ImageError) as e:
      lines.append(f"{path}\t{str(e).replace(chr(10), ' ')}\n")
  logging.warning(
    "%s: %d of %d rows have an unreadable image and count as wrong; %s beside the results "
    "lists the %d files",
    dataset,
    rows,
    of,
    image_files.SKIP_LIST_FILE,
    len(lines),
  )

  def write(path: str) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(f"{path}.tmp", path)

  return {image_files.SKIP_LIST_FILE: write}


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
      preemption.check_stop()  # A SIGTERM stops the evaluation between batches.
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
    bad = [self.examples[i].image for i in np.flatnonzero(unreadable)]
    files.update(_unreadable_files(self.dataset, bad, len(bad), len(self.examples)))
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
  """NLVR2's accuracy and consistency; with `group_of`, the accuracy of each group too
  ("accuracy/<group>": the built-in set's statement kinds)."""

  name = "nlvr2"

  def __init__(
    self,
    dataset: str,
    examples: Sequence[task_data.Nlvr2Example],
    nlvr2_logits: Callable[..., jax.Array],
    group_of: Callable[[task_data.Nlvr2Example], str] | None = None,
  ):
    self.dataset, self.examples, self.group_of = dataset, list(examples), group_of

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
    if self.group_of is not None:
      by_group = nlvr2.accuracy_by_group(predictions, self.examples, self.group_of)
      metrics.update({f"accuracy/{group}": value / 100 for group, value in by_group.items()})

    def write_predictions(path: str) -> None:
      nlvr2.write_nlvr2_predictions(path, predictions)

    files = {
      "nlvr2_accuracy.json": _write_json(official),
      "nlvr2_predictions.csv": write_predictions,
    }
    pairs = [self.examples[i] for i in np.flatnonzero(unreadable)]
    bad = [p for e in pairs for p in (e.left, e.right)]
    files.update(_unreadable_files(self.dataset, bad, len(pairs), len(self.examples)))
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
  """Image and text retrieval ranked by the matching head: over every pair, or over each
  query's `shortlist_k` nearest by a dual encoder's embeddings (computed once)."""

  name = "itm_retrieval"

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
    headline = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in self.ks]
    return [Result(self.name, data.name, metrics, headline)]

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


# ----------------------------------------------------------------------------- factory


def builtin_statement_kind(example: task_data.Nlvr2Example) -> str:
  """The built-in NLVR2 set's statement kind of `example` (Nlvr2Task's group_of)."""
  return builtin_tasks.statement_kind(example.sentence)


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
      raise ConfigError(f"task {name} needs a dataset: {flag}=<path>[,key=value...] or builtin")
    missing = [fn for fn in TASK_NEEDS[name] if fn not in predict_fns]
    if missing:
      raise ConfigError(f"evaluation task {name!r} needs {', '.join(missing)}")
    if name == "vqa":
      dataset, examples = read_vqa_spec(text, False, builtin, flag)
      answers = config_answer_vocab(config)
      tasks.append(VqaTask(dataset, examples, answers, predict_fns["vqa_logits"]))
    elif name == "nlvr2":
      dataset, examples = read_nlvr2_spec(text, False, builtin, flag)
      group_of = builtin_statement_kind if text == BUILTIN else None
      tasks.append(Nlvr2Task(dataset, examples, predict_fns["nlvr2_logits"], group_of))
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
      tune, shortlist = config.finetune, None
      if tune.shortlist:
        if tune.shortlist_k < 1:
          raise ValueError(f"config.finetune.shortlist_k={tune.shortlist_k}: give k >= 1")
        shortlist = load_dual_encoder(tune.shortlist)
      tasks.append(
        ItmRetrievalTask(data, predict_fns, config.eval.recall_ks, shortlist, tune.shortlist_k)
      )
    else:
      raise ValueError(f"unknown fine-tuning task {name!r}; known: {', '.join(TASKS)}")
  return tasks
