"""Evaluation shared by the trainer (periodic) and eval.py (checkpoints of a run).

`create_evaluator` reads every dataset the configured tasks need, then
`Evaluator.evaluate(params)` embeds them on the device mesh and returns one `Result`
per task and dataset; `report` writes them as CLIP_benchmark-style JSON files and a
Markdown summary. Modules: retrieval / classification / linear_probe / compositional
/ vqa / nlvr2 (metrics), readers / compositional_readers (official file formats),
embedding (the mesh-sharded encoder), rerank (a matching head on the mesh), tasks/ (one
module per task, in one registry: the evaluator names none), report. eval.py's loop over
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
from vlp_jax.evaluation import readers, report
from vlp_jax.evaluation.embedding import Embedder, EmbedFn, Tokenizer
from vlp_jax.evaluation.tasks import REGISTRY, Context, Result, Task, check_servable, create_tasks
from vlp_jax.evaluation.tasks.base import RunConfigFn
from vlp_jax.input_pipeline.image_sources import DataError, ImageRef

__all__ = [
  "REGISTRY",
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
  run_config: RunConfigFn | None = None,
) -> Evaluator:
  """Reads the datasets of `tasks` (default: config.eval.tasks) and builds the embedder
  over a method's prediction functions. `run_config` rebuilds a saved run's config from
  its config.json (the shortlist of itm_retrieval)."""
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
  # Each task builds itself from the context, in config order: no task is named here.
  ctx = Context(config, predict_fns, embedder, heldout, run_config)
  return Evaluator(embedder, create_tasks(names, ctx, config.method), model_name)


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
