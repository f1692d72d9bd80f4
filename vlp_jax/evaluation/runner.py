"""eval.py's loop: restore a run's checkpoints one by one and evaluate each.

The datasets are read and the encoders compiled once; every checkpoint's results go to
`<output_dir>/step_<N>/` and the summary table is rebuilt after each.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

from vlp_jax import checkpointing, evaluation, progress, trainer
from vlp_jax.evaluation import report


def checkpoint_steps(manager, workdir: str, step: int | None, all_checkpoints: bool) -> list[int]:
  available = sorted(manager.all_steps())
  if not available:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  if all_checkpoints:
    return available
  if step is None:
    return [available[-1]]
  if step not in available:
    raise FileNotFoundError(f"no checkpoint of step {step} in {workdir}; it has {available}")
  return [step]


def evaluate_run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  tasks: Sequence[str] | None = None,
  step: int | None = None,
  all_checkpoints: bool = False,
  output_dir: str = "",
  show_progress: bool = True,
) -> dict[int, list[evaluation.Result]]:
  """Evaluates the newest checkpoint, checkpoint `step`, or every checkpoint of a run."""
  exp = trainer.create_experiment(config, workdir)
  manager = checkpointing.create_checkpoint_manager(workdir, config)
  steps = checkpoint_steps(manager, workdir, step, all_checkpoints)
  evaluator = evaluation.create_evaluator(
    config,
    exp.model,
    exp.mesh,
    exp.tokenizer,
    exp.eval_shards,
    tasks=tasks,
    show_progress=show_progress,
  )
  abstract, state_sharding = trainer.abstract_train_state(exp.model, exp.tx, exp.mesh, config.seed)
  abstract = checkpointing.abstract_with_shardings(abstract, state_sharding)
  writer = progress.create_metric_writer(workdir)
  output_dir = output_dir or os.path.join(workdir, "eval")
  all_results = {}
  for number, current in enumerate(steps, 1):
    logging.info("Evaluating the checkpoint of step %d (%d/%d)", current, number, len(steps))
    params = checkpointing.restore_state(manager, current, abstract).params
    results = evaluator.evaluate(params)
    del params  # Frees the device copy before the next checkpoint is restored.
    evaluation.log_and_write(
      results, current, workdir, writer, out_dir=output_dir, model=evaluator.model_name
    )
    all_results[current] = results
  writer.flush()
  if jax.process_index() == 0:
    print(report.result_table(*_flatten(all_results)))
    print(f"\nResults in {output_dir} (summary.md)")
  return all_results


def _flatten(
  by_step: dict[int, list[evaluation.Result]],
) -> tuple[list[evaluation.Result], list[int]]:
  pairs = [(s, r) for s, results in by_step.items() for r in results]
  pairs.sort(key=lambda p: (p[1].task, p[0]))
  return [r for _, r in pairs], [s for s, _ in pairs]
