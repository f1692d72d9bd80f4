"""Result files in CLIP_benchmark's layout and the Markdown summary of a run.

Each result is `<out>/step_<N>/<dataset>_<task>.json` holding CLIP_benchmark's keys
(dataset, model, pretrained, task, metrics, language) plus step and headline, so
`clip_benchmark build <out>/step_*/` turns them into its CSV. `summary.md` is rebuilt
from every result file under `<out>`: one table per task, a row per step and dataset.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Sequence

import jax

from vlp_jax.evaluation.tasks import Result

SHORT_NAMES = {
  **{f"image_retrieval_recall@{k}": f"t->i R@{k}" for k in (1, 5, 10)},
  **{f"text_retrieval_recall@{k}": f"i->t R@{k}" for k in (1, 5, 10)},
  "mean_per_class_recall": "mean per-class recall",
  "lp_mean_per_class_recall": "lp mean per-class recall",
}
# Metrics that are not fractions: printed as they are, not as percentages.
_RAW = re.compile(r"(rank|weight_decay|threshold|epochs|seed|num_\w+)$")


def format_value(key: str, value: float) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "nan"
  if _RAW.search(key):
    return f"{value:.4g}"
  return f"{100 * value:.1f}"


def slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"


def result_path(out_dir: str, step: int, result: Result) -> str:
  return os.path.join(out_dir, f"step_{step:08d}", f"{slug(result.dataset)}_{result.task}.json")


def write_results(
  results: Sequence[Result], step: int, out_dir: str, model: str, pretrained: str
) -> list[str]:
  """Writes each result's JSON (process 0 only); returns the paths."""
  paths = []
  for result in results:
    path = result_path(out_dir, step, result)
    paths.append(path)
    if jax.process_index() != 0:
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {
      "dataset": result.dataset,
      "model": model,
      "pretrained": pretrained,
      "task": result.task,
      "metrics": result.metrics,
      "language": "en",
      "step": step,
      "headline": result.headline,
    }
    with open(f"{path}.tmp", "w") as f:
      json.dump(payload, f, indent=2)
    os.replace(f"{path}.tmp", path)
  return paths


def result_table(results: Sequence[Result], steps: Sequence[int] | None = None) -> str:
  """Markdown tables, one per task, a row per (step, dataset); metrics in percent."""
  by_task: dict[str, list[tuple[int | None, Result]]] = {}
  for i, result in enumerate(results):
    by_task.setdefault(result.task, []).append((steps[i] if steps else None, result))
  blocks = []
  for task, rows in by_task.items():
    keys = list(dict.fromkeys(k for _, r in rows for k in r.headline))
    head = (["step"] if steps else []) + ["dataset"] + [SHORT_NAMES.get(k, k) for k in keys]
    lines = [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step, r in rows:
      cells = ([str(step)] if steps else []) + [r.dataset]
      cells += [format_value(k, r.metrics[k]) if k in r.metrics else "" for k in keys]
      lines.append("| " + " | ".join(cells) + " |")
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def load_results(out_dir: str) -> tuple[list[int], list[Result]]:
  steps, results = [], []
  for path in sorted(glob.glob(os.path.join(out_dir, "step_*", "*.json"))):
    with open(path) as f:
      data = json.load(f)
    steps.append(int(data["step"]))
    results.append(Result(data["task"], data["dataset"], data["metrics"], data["headline"]))
  order = sorted(range(len(steps)), key=lambda i: (results[i].task, steps[i], results[i].dataset))
  return [steps[i] for i in order], [results[i] for i in order]


def write_summary(out_dir: str, title: str) -> str:
  """Rebuilds `<out>/summary.md` from every result file; returns its text."""
  steps, results = load_results(out_dir)
  text = f"# {title}\n\nPercent unless named otherwise.\n\n{result_table(results, steps)}\n"
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
      f.write(text)
  return text
