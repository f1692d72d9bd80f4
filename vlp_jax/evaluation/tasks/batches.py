"""Running a method's prediction function over a task's own batches on the mesh, and
the files a fine-tuning task writes beside its result.

Batches go through the mesh as the Embedder's do: the same static global batch, padding
rows marked -1, outputs gathered to every host and put back in order by row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax import preemption, sharding
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.input_pipeline import image_files, pipeline, task_data


def unreadable_files(
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


def write_json(value: Any) -> Callable[[str], None]:
  def write(path: str) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
      json.dump(value, f, indent=2)
    os.replace(f"{path}.tmp", path)

  return write


def eval_dataset_args(embedder: Embedder) -> dict[str, Any]:
  """The keyword arguments of a task's own evaluation dataset (fixed order, no
  augmentation, this process's rows) for the embedder's batch and image size."""
  return dict(
    image_size=embedder.image_size,
    batch_size=embedder.local_batch,
    seed=0,
    train=False,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    read_threads=embedder.read_threads,
  )


class BatchRunner:
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


def with_rows(batches: Iterable[dict[str, np.ndarray]], row_of: Callable[[dict], np.ndarray]):
  for batch in batches:
    yield {**batch, "row": row_of(batch).astype(np.int32)}
