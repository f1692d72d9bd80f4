"""NLVR2: the method's "nlvr2_logits" (params, left, right, tokens) -> (B, 2); accuracy
and consistency as NLVR2's script (evaluation/nlvr2.py), and on the built-in set the
accuracy of each statement kind.

Dataset: config.eval.data.nlvr2, an NLVR2 jsonl (`dev.json,images=DIR`) or "builtin".
Beside the result JSON: the accuracy dict and the "identifier,True|False" predictions
the script reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlp_jax.evaluation import nlvr2
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks import batches
from vlp_jax.evaluation.tasks.base import Context, Result, Task, TaskDef
from vlp_jax.input_pipeline import builtin_nlvr2, finetune_data, nlvr2_data

NAME = "nlvr2"


class Nlvr2Task(Task):
  """NLVR2's accuracy and consistency; with `group_of`, the accuracy of each group too
  ("accuracy/<group>": the built-in set's statement kinds)."""

  name = NAME

  def __init__(
    self,
    dataset: str,
    examples: Sequence[nlvr2_data.Nlvr2Example],
    nlvr2_logits: Callable[..., jax.Array],
    group_of: Callable[[nlvr2_data.Nlvr2Example], str] | None = None,
  ):
    self.dataset, self.examples, self.group_of = dataset, list(examples), group_of

    def holds(params: Any, left: jax.Array, right: jax.Array, tokens: jax.Array) -> jax.Array:
      return jax.numpy.argmax(nlvr2_logits(params, left, right, tokens), axis=-1).astype(
        jax.numpy.int32
      )

    self._runner = batches.BatchRunner(holds, ("image", "image2", "tokens"))

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    data_batches = nlvr2_data.create_nlvr2_dataset(
      self.examples,
      embedder.tokenizer,
      **batches.eval_dataset_args(embedder),
    )
    unreadable = np.zeros(len(self.examples), bool)

    def row_of(batch: dict) -> np.ndarray:
      rows = np.asarray(batch["index"])
      unreadable[rows[(rows >= 0) & ~batch["valid"]]] = True
      return rows

    holds = self._runner.run(
      embedder, params, batches.with_rows(data_batches, row_of), len(self.examples)
    )
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
      "nlvr2_accuracy.json": batches.write_json(official),
      "nlvr2_predictions.csv": write_predictions,
    }
    pairs = [self.examples[i] for i in np.flatnonzero(unreadable)]
    bad = [p for e in pairs for p in (e.left, e.right)]
    files.update(batches.unreadable_files(self.dataset, bad, len(pairs), len(self.examples)))
    headline = ["accuracy", "consistency", "num_examples"]
    return [Result(self.name, self.dataset, metrics, headline, files=files)]


def builtin_statement_kind(example: nlvr2_data.Nlvr2Example) -> str:
  """The built-in NLVR2 set's statement kind of `example` (Nlvr2Task's group_of)."""
  return builtin_nlvr2.statement_kind(example.sentence)


def create(ctx: Context) -> list[Task]:

  flag = f"--data.{NAME}"
  text = ctx.dataset(NAME, " or builtin")
  builtin = finetune_data.BuiltinSets.for_spec(ctx.config, text)
  dataset, examples = finetune_data.read_nlvr2_spec(text, False, builtin, flag)
  group_of = builtin_statement_kind if builtin is not None else None
  return [Nlvr2Task(dataset, examples, ctx.predict_fns["nlvr2_logits"], group_of)]


TASK = TaskDef(NAME, ("nlvr2_logits",), create, needs_what="nlvr2 head")
