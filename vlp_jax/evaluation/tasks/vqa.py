"""VQAv2: the method's "vqa_logits" (params, images, tokens) -> (B, answers); the argmax
answer scored by the official metric (evaluation/vqa.py) overall, per answer type and per
question type. Questions without annotations (test-dev) are only answered.

Dataset: config.eval.data.vqa, `QUESTIONS_JSON,annotations=ANNOTATIONS_JSON,images=DIR` or
"builtin" (the generated set sized by config.finetune.builtin); the answers are the
fine-tuning run's (config.finetune.answers or its training annotations): both read from
the fine-tuning run's config, whose method's block (config.finetune) they are. Beside
the result JSON: the official accuracy dict and the test-dev style
`[{"question_id", "answer"}]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlp_jax.evaluation import vqa
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks import batches
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef
from vlp_jax.input_pipeline import finetune_data, vqa_data
from vlp_jax.input_pipeline.image_sources import DataError

NAME = "vqa"


class VqaTask(Task):
  """VQAv2's official accuracy of the argmax answer."""

  name = NAME

  def __init__(
    self,
    dataset: str,
    examples: Sequence[vqa_data.VqaExample],
    answers: Sequence[str],
    vqa_logits: Callable[..., jax.Array],
  ):
    self.dataset, self.examples, self.answers = dataset, list(examples), list(answers)
    self._index = {e.question_id: i for i, e in enumerate(self.examples)}
    if len(self._index) != len(self.examples):
      raise DataError(f"{dataset}: question ids repeat")

    def answer(params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
      return jax.numpy.argmax(vqa_logits(params, images, tokens), axis=-1).astype(jax.numpy.int32)

    self._runner = batches.BatchRunner(answer, ("image", "tokens"))

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    data_batches = vqa_data.create_vqa_dataset(
      self.examples,
      embedder.tokenizer,
      self.answers,
      **batches.eval_dataset_args(embedder),
    )
    unreadable = np.zeros(len(self.examples), bool)

    def row_of(batch: dict) -> np.ndarray:
      rows = np.asarray([self._index.get(int(q), -1) for q in batch["question_id"]])
      unreadable[rows[(rows >= 0) & ~batch["valid"]]] = True
      return rows

    chosen = self._runner.run(
      embedder, params, batches.with_rows(data_batches, row_of), len(self.examples)
    )
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
    files = {"vqa_results.json": batches.write_json(_results_list(predictions))}
    bad = [self.examples[i].image for i in np.flatnonzero(unreadable)]
    files.update(batches.unreadable_files(self.dataset, bad, len(bad), len(self.examples)))
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
      files["vqa_accuracy.json"] = batches.write_json(
        {k: official[k] for k in ("overall", "perAnswerType", "perQuestionType")}
      )
      types = [f"perAnswerType/{t}" for t in ("yes/no", "number", "other")]
      headline = ["overall", *[t for t in types if t in metrics], "num_questions"]
    return [Result(self.name, self.dataset, metrics, headline, files=files)]


def _results_list(predictions: Mapping[int, str]) -> list[dict[str, Any]]:
  return [{"question_id": int(q), "answer": str(a)} for q, a in predictions.items()]


def create(ctx: Context) -> list[Task]:

  flag = f"--data.{NAME}"
  text = ctx.dataset(NAME, " or builtin")
  builtin = finetune_data.BuiltinSets.for_spec(ctx.config, text)
  dataset, examples = finetune_data.read_vqa_spec(text, False, builtin, flag)
  answers = finetune_data.config_answer_vocab(ctx.config)
  return [VqaTask(dataset, examples, answers, ctx.predict_fns["vqa_logits"])]


TASK = TaskDef(NAME, ("vqa_logits",), create, needs_what="vqa head")
