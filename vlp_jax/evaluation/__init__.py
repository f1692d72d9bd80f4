"""Evaluation shared by the trainer (periodic) and eval.py (checkpoints of a run).

`create_evaluator` reads every dataset the configured tasks need, then
`Evaluator.evaluate(params)` embeds them on the device mesh and returns one `Result`
per task and dataset; `report` writes them as CLIP_benchmark-style JSON files and a
Markdown summary. Modules: retrieval / classification / linear_probe / compositional
(metrics), readers / classification_readers / compositional_readers (official file
formats), embedding (the mesh-sharded encoder), tasks, report. eval.py's loop over
checkpoints is vlp_jax/eval_runner.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from vlp_jax import progress
from vlp_jax.evaluation import agent_report, finetune, readers, report, rerank
from vlp_jax.evaluation.embedding import Embedder, EmbedFn, Tokenizer
from vlp_jax.evaluation.tasks import TASK_NEEDS, TASKS, Result, Task, check_servable, create_tasks
from vlp_jax.input_pipeline.image_sources import DataError, ImageRef

__all__ = [
  "TASKS",
  "TASK_NEEDS",
  "DataError",
  "Embedder",
  "Evaluator",
  "ImageRef",
  "Result",
  "Task",
  "check_servable",
  "create_evaluator",
  "heldout_metrics",
  "log_and_write",
  "task_names",
]


class Evaluator:
  """The tasks of an evaluation and the embedder they share."""

  def __init__(self, embedder: Embedder, tasks: Sequence[Task], model_name: str = ""):
    self.embedder, self.tasks, self.model_name = embedder, list(tasks), model_name

  def evaluate(self, params: Any) -> list[Result]:
    results = []
    for task in self.tasks:
      results.extend(task.evaluate(self.embedder, params))
    return results


def task_names(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def create_evaluator(
  config: ml_collections.ConfigDict,
  predict_fns: dict[str, EmbedFn],
  mesh: Mesh,
  tokenizer: Tokenizer,
  eval_shards: Sequence[str],
  *,
  tasks: Sequence[str] | None = None,
  show_progress: bool = False,
  model_name: str = "",
) -> Evaluator:
  """Reads the datasets of `tasks` (default: config.eval.tasks) and builds the embedder
  over a method's prediction functions."""
  names = task_names(config.eval.tasks) if tasks is None else list(tasks)
  eval_name = config.data.eval or "builtin-heldout"

  def heldout() -> readers.RetrievalSet:
    return readers.read_record_retrieval(eval_shards, config.eval.max_captions, eval_name)

  embedder = Embedder(
    predict_fns,
    mesh,
    tokenizer,
    batch_size=config.eval.batch_size,
    image_size=config.model.image.image_size,
    read_threads=config.data.read_threads,
    show_progress=show_progress,
  )
  # A method with an ITM head (match_image + match_score) also gets ALBEF's re-ranked
  # retrieval and ITM-scored compositional results (config.eval.rerank_k > 0).
  matcher = rerank.create_matcher(predict_fns, embedder) if config.eval.rerank_k else None

  def agent_masking() -> Task:  # CMask: which words its agent masks (agent_logits).
    return agent_report.create_task(config, predict_fns, heldout)

  tasks = create_tasks(
    [n for n in names if n not in finetune.TASKS], config.eval, heldout, matcher, agent_masking
  )
  # Fine-tuned heads (VQA, NLVR2, classification, ITM-only retrieval), after the others.
  tuned = [n for n in names if n in finetune.TASKS]
  tasks += finetune.create_tasks(tuned, config, predict_fns, heldout)
  return Evaluator(embedder, tasks, model_name)


def heldout_metrics(results: Sequence[Result]) -> dict[str, float]:
  """The held-out retrieval metrics (what train_and_evaluate returns), else the first's."""
  for result in results:
    if result.heldout:
      return result.metrics
  return results[0].metrics if results else {}


def log_and_write(
  results: Sequence[Result],
  step: int,
  workdir: str,
  writer: metric_writers.MetricWriter,
  *,
  out_dir: str = "",
  model: str = "",
) -> str:
  """TensorBoard scalars and texts, JSON files, the rebuilt summary; logs and returns the
  tables."""
  out_dir = out_dir or os.path.join(workdir, "eval")
  scalars = {}
  for r in results:
    prefix = "eval" if r.heldout else f"eval/{r.task}/{r.dataset}"
    scalars.update({f"{prefix}/{k}": v for k, v in r.metrics.items()})
  writer.write_scalars(step, scalars)
  texts = {f"eval/{r.task}/{r.dataset}/{k}": v for r in results for k, v in r.texts.items()}
  if texts:  # Markdown tables (CMask's masked words) as TensorBoard text summaries.
    writer.write_texts(step, texts)
  pretrained = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  report.write_results(results, step, out_dir, model, pretrained)
  for r in results:  # A benchmark's own files, beside its result JSON.
    if r.files and jax.process_index() == 0:
      folder = report.result_path(out_dir, step, r).removesuffix(".json")
      os.makedirs(folder, exist_ok=True)
      for name, write in r.files.items():
        write(os.path.join(folder, name))
  retrieval = [r for r in results if r.heldout]
  if retrieval:  # The newest held-out retrieval, where the README's demo points.
    progress.write_json(
      os.path.join(workdir, "eval_retrieval.json"),
      {
        "step": step,
        "task": "zeroshot_retrieval",
        "dataset": retrieval[0].dataset,
        "metrics": retrieval[0].metrics,
      },
    )
  report.write_summary(out_dir, f"Evaluation of {os.path.abspath(workdir)}")
  tables = report.result_table(results)
  logging.info("Evaluation at step %d:\n%s", step, tables)
  return tables
