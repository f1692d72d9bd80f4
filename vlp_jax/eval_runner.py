"""eval.py's loop: restore a run's checkpoints one by one and evaluate each.

The datasets are read and the encoders compiled once; every checkpoint's results go to
`<output_dir>/step_<N>/` and the summary table is rebuilt after each. A run describes
itself: `load_run_config` rebuilds its config from the config.json the trainer wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

from vlp_jax import checkpointing, evaluation, experiment, progress, trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import run_config
from vlp_jax.evaluation import report
from vlp_jax.input_pipeline import tokenizers
from vlp_jax.weights.convert import RUN_CONFIG_FILE, TOKENIZER_FILE


def check_run_dir(workdir: str, checkpoints: bool = True) -> None:
  """Fails (FileNotFoundError naming it) unless `workdir` is a run (with checkpoints);
  evaluating never creates a workdir, so a mistyped one is an error."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"no run at {workdir}: the directory does not exist")
  if checkpoints and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")


def load_run_config(
  workdir: str, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """The locked config of the run in `workdir`, from its config.json.

  The JSON values go onto `base` (default: vlp_jax.configs.common's, run_base), which
  gives them their types back (tuples, None-valued FieldReferences, floats); a key the
  base config lacks fails with a ConfigError naming it, a missing file or workdir with a
  FileNotFoundError.
  """
  check_run_dir(workdir, checkpoints=False)
  path = os.path.join(workdir, RUN_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} does not exist (train.py writes it when a run starts): pass the run's "
      "--config and its --config.* flags"
    )
  with open(path) as f:
    values = json.load(f)
  return run_config.from_values(values, path, base)


def check_tokenizer(workdir: str, tokenizer: tokenizers.Tokenizer, kind: str) -> None:
  """Fails (ConfigError) when the config's tokenizer is not the one the run trained with,
  which would otherwise surface as a shape error deep inside the checkpoint restore."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    trained = json.load(f)
  if (trained.get("kind"), trained.get("vocab_size")) != (kind, tokenizer.vocab_size):
    raise ConfigError(
      f"the run trained with a {trained.get('kind')} tokenizer of {trained.get('vocab_size')} "
      f"tokens ({path}); this config gives {kind} with {tokenizer.vocab_size}: leave out "
      "--config to use the run's own config.json, or set config.data.tokenizer and "
      "config.data.vocab_file as in training"
    )


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
  """Evaluates the newest checkpoint, checkpoint `step`, or every checkpoint of a run.

  Before any data is read or compute runs, a ConfigError when there is nothing to
  evaluate, `output_dir` cannot be written, or the run's method lacks what a task needs.
  """
  check_run_dir(workdir)
  names = evaluation.task_names(config.eval.tasks) if tasks is None else list(tasks)
  if not names:
    raise ConfigError(
      f"nothing to evaluate: the run's config.eval.tasks is empty ({workdir}) and no "
      "--tasks was given; name them, e.g. --tasks=heldout "
      f"(known: {', '.join(evaluation.REGISTRY)})"
    )
  output_dir = output_dir or os.path.join(workdir, "eval")
  experiment.check_writable_dir(output_dir, "--output_dir")
  exp = trainer.create_experiment(config, workdir)
  try:
    evaluation.check_servable(names, list(exp.method.predict_fns()), config.method)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  check_tokenizer(workdir, exp.tokenizer, config.data.tokenizer)
  manager = checkpointing.create_checkpoint_manager(workdir, config)
  steps = checkpoint_steps(manager, workdir, step, all_checkpoints)
  evaluator = exp.evaluator(names, show_progress)
  abstract, state_sharding = trainer.abstract_train_state(exp.method, exp.tx, exp.mesh, config.seed)
  abstract = checkpointing.abstract_with_shardings(abstract, state_sharding)
  for current in steps:  # Before any compute: a config that does not fit names the keys.
    checkpointing.require_match(manager, current, abstract)
  writer = progress.create_metric_writer(workdir)
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
