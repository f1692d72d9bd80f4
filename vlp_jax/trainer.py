"""The training loop for any method: train state, the jitted step, checkpoints, evaluation.

Read top to bottom: TrainState -> train_step (the method's loss and gradients -> the
optimizer -> the non-finite guard -> health metrics) -> state creation -> the loop.
The method (vlp_jax/methods) owns model, objective and extra state; the experiment
(experiment.py) is built and validated from the config before any compute.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlp_jax import checkpointing, evaluation, preemption, progress, sharding, workdir_lock
from vlp_jax.experiment import Experiment, StepParts, create_experiment
from vlp_jax.methods import DataContext, Method
from vlp_jax.weights import convert

StepFn = Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  extra: Any  # The method's non-parameter state (EMA copies, queues...), sharded by path.
  opt_state: Any
  rng: jax.Array  # Base key; each step folds in its step number.
  nonfinite_streak: jax.Array  # Non-finite losses in a row (update skipped each time).
  nonfinite_total: jax.Array


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  method: Method,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; a non-finite loss leaves the state unchanged."""
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, (metrics, extra)), grads = method.loss_and_grads(
    state.params, state.extra, batch, rng, state.step
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_new = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = state.replace(
    step=state.step + 1,
    params=keep_new(params, state.params),
    extra=keep_new(extra, state.extra),
    opt_state=keep_new(opt_state, state.opt_state),
    nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
  )
  metrics = dict(metrics)
  metrics.update(
    learning_rate=schedule(state.step),
    grad_norm=grad_norm,
    param_norm=optax.global_norm(state.params),
    update_norm=optax.global_norm(updates),
    nonfinite_streak=new_state.nonfinite_streak,
    nonfinite_total=new_state.nonfinite_total,
  )
  return new_state, metrics


def _init_fn(method: Method, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  def init(rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params, extra = method.init(init_rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      extra=extra,
      opt_state=tx.init(params),
      rng=state_rng,
      nonfinite_streak=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
    )

  return init


def abstract_train_state(
  method: Method, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, Any]:
  """Shapes and dtypes of the train state, and the shardings it is created with
  (parameters, extra state and optimizer moments alike: by path)."""
  abstract = jax.eval_shape(_init_fn(method, tx), jax.random.PRNGKey(seed))
  return abstract, sharding.state_shardings(abstract, mesh)


def create_train_state(
  method: Method, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings (no full copy on one device)."""
  _, state_sharding = abstract_train_state(method, tx, mesh, seed)
  init = jax.jit(_init_fn(method, tx), out_shardings=state_sharding)
  return init(jax.random.PRNGKey(seed)), state_sharding


def compile_step(parts: StepParts, state_sharding: Any) -> StepFn:
  """`train_step` of `parts` (an Experiment or StepParts) jitted once with explicit
  shardings; the old state's buffers are donated."""
  step = functools.partial(train_step, method=parts.method, tx=parts.tx, schedule=parts.schedule)

  def step_on_mesh(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    # Traced under the mesh: the models' activation constraints (sharding.constrain_batch)
    # read it.
    with jax.sharding.use_abstract_mesh(parts.mesh.abstract_mesh):
      return step(state, batch)

  return jax.jit(
    step_on_mesh,
    in_shardings=(state_sharding, sharding.batch_sharding(parts.mesh)),
    out_shardings=(state_sharding, sharding.replicated(parts.mesh)),
    donate_argnums=0,
  )


def run_eval(
  evaluator: evaluation.Evaluator,
  params: Any,
  step: int,
  workdir: str,
  writer: metric_writers.MetricWriter,
) -> dict[str, float]:
  """Runs config.eval.tasks, writes <workdir>/eval/ and returns held-out retrieval metrics
  ({} when there are no tasks)."""
  if not evaluator.tasks:
    return {}
  results = evaluator.evaluate(params)
  evaluation.log_and_write(results, step, workdir, writer, model=evaluator.model_name)
  return evaluation.heldout_metrics(results)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in workdir) and returns final eval metrics."""
  exp = create_experiment(config, workdir)
  with workdir_lock.hold(workdir):  # One trainer per workdir (process 0 holds it).
    return _train_and_evaluate(exp)


def _train_and_evaluate(exp: Experiment) -> dict[str, float]:
  config, workdir = exp.config, exp.workdir
  writer = progress.create_metric_writer(workdir)
  state, state_sharding = create_train_state(exp.method, exp.tx, exp.mesh, config.seed)
  logging.info(
    "Method %s: %s; %d steps of batch %d on %d devices (mesh %s)",
    config.method,
    exp.method.summary(state.params),
    exp.total_steps,
    config.batch_size,
    jax.device_count(),
    dict(exp.mesh.shape),
  )

  manager = checkpointing.create_checkpoint_manager(workdir, config)
  abstract_state = checkpointing.abstract_with_shardings(state, state_sharding)
  fresh = manager.latest_step() is None
  if fresh:  # Before the data: a method may prepare its rows with the starting model.
    state = _initialise_params(exp, state, state_sharding)
  evaluator = exp.evaluator()
  data_context = DataContext(
    workdir,
    state.params,
    functools.partial(evaluator.embedder.images, state.params),
    exp.train_sets,
    exp.tokenizer,
    exp.local_batch_size,
  )
  batches = exp.method.train_data(data_context)
  if batches is None:
    batches = exp.train_dataset(exp.method.pipeline_extension(data_context))
  train_iter = iter(batches)
  if restored := checkpointing.restore_newest_good(manager, abstract_state, train_iter):
    logging.info("Resuming from the checkpoint of step %d", restored[0])
    state = restored[1]
  elif not fresh:  # Checkpoints exist but none is readable: start over.
    state = _initialise_params(exp, state, state_sharding)
  progress.truncate_metrics(workdir, int(state.step))  # Steps about to be re-run.
  # After the restore: a config the checkpoints do not fit keeps the run's config.json.
  if jax.process_index() == 0:
    with open(os.path.join(workdir, convert.RUN_CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    progress.write_json(os.path.join(workdir, convert.TOKENIZER_FILE), exp.tokenizer_info())

  # Compiled ahead of the loop: one compilation; its jaxpr's FLOPs give the MFU.
  traced = compile_step(exp, state_sharding).trace(state, exp.abstract_batch())
  step_fn = traced.lower().compile()
  log = progress.ProgressLog(writer, exp, int(state.step), progress.step_flops(traced))
  eval_metrics: dict[str, float] = {}
  try:
    with preemption.PreemptionWatcher() as watcher:
      eval_metrics = _train_loop(exp, state, step_fn, train_iter, manager, evaluator, log, watcher)
  finally:
    checkpointing.wait_for_saves(manager)
    writer.flush()
    if hasattr(train_iter, "close"):
      train_iter.close()  # Stops grain's worker processes and frees their shared memory.
  return eval_metrics


def _initialise_params(exp: Experiment, state: TrainState, state_sharding: Any) -> TrainState:
  """A fresh run's parameters: config.init_from's run, or the method's pretrained ones."""
  if exp.config.init_from:
    logging.info("Initialising the parameters from %s", exp.config.init_from)
    abstract = checkpointing.abstract_with_shardings(state, state_sharding)
    return state.replace(params=checkpointing.load_params(exp.config.init_from, abstract))
  params = exp.method.pretrained_params(
    lambda: multihost_utils.process_allgather(state.params, tiled=True)
  )
  if params is None:
    return state
  return state.replace(params=sharding.host_tree_to_global(params, state_sharding.params))


def _train_loop(
  exp: Experiment,
  state: TrainState,
  step_fn: Any,
  train_iter: grain.DatasetIterator,
  manager: ocp.CheckpointManager,
  evaluator: evaluation.Evaluator,
  log: progress.ProgressLog,
  watcher: preemption.PreemptionWatcher,
) -> dict[str, float]:
  config, workdir = exp.config, exp.workdir
  writer = log.writer
  start_step = int(state.step)
  stop_step = start_step + config.stop_after_steps if config.stop_after_steps else None
  eval_metrics: dict[str, float] = {}
  profile_last = config.profile_first_step + config.profile_num_steps - 1
  tracing = False
  fields = exp.batch_fields
  for step in range(start_step + 1, exp.total_steps + 1):
    if config.profile_first_step and step == config.profile_first_step:
      jax.profiler.start_trace(workdir)  # Open with TensorBoard's profile tab.
      tracing = True
    host_batch = next(train_iter)
    device_batch = {k: host_batch[k] for k in fields}
    state, metrics = step_fn(state, sharding.host_to_global(device_batch, exp.mesh))
    checkpointing.check_saves(manager)  # A failed save (full disk) stops the run now.
    last_step = step == exp.total_steps or step == stop_step
    if tracing and (step >= profile_last or last_step):
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      tracing = False
    log.add(metrics, int(host_batch["skipped"].sum()))
    logged = None
    if step % config.log_every_steps == 0 or last_step:
      logged = log.flush(step)
    if jax.process_index() == 0 and (images := exp.method.images_to_log(host_batch, step)):
      writer.write_images(step, images)
    preempted = watcher.should_stop(step)  # Every step: multi-host agreement needs it.
    saved = step % config.checkpoint_every_steps == 0 or last_step or preempted
    if saved:
      checkpointing.save_checkpoint(manager, step, state, train_iter)
    if logged is not None:
      # After the save: a run stopped at its end (too many unreadable images) keeps its steps.
      log.check_health(config, logged, saved_step=step if saved else None)
    if preempted:
      logging.warning("Preempted: saved the checkpoint of step %d; exiting.", step)
      return eval_metrics
    if (config.eval.every_steps and step % config.eval.every_steps == 0) or last_step:
      eval_start = time.time()
      try:
        eval_metrics = run_eval(evaluator, state.params, step, workdir, writer)
      except preemption.Preempted:
        if not saved:
          checkpointing.save_checkpoint(manager, step, state, train_iter)
        _log_stopped_evaluation(workdir, step)
        return eval_metrics
      log.paused += time.time() - eval_start
    if step == stop_step:
      logging.info(
        "Stopping after %d steps of this run (config.stop_after_steps)", config.stop_after_steps
      )
      return eval_metrics
  if not eval_metrics:  # Resumed at the end: evaluate the final state anyway.
    try:
      eval_metrics = run_eval(evaluator, state.params, exp.total_steps, workdir, writer)
    except preemption.Preempted:
      _log_stopped_evaluation(workdir, exp.total_steps)
  return eval_metrics


def _log_stopped_evaluation(workdir: str, step: int) -> None:
  logging.warning(
    "SIGTERM during the evaluation of step %d: stopped it; the checkpoint of step %d is "
    "saved (python eval.py --workdir=%s --step=%d evaluates it); exiting.",
    step,
    step,
    workdir,
    step,
  )


def restore_params(exp: Experiment, step: int | None = None) -> tuple[int, Any]:
  """(step, parameters) of the newest (or the given) checkpoint of the experiment's run."""
  manager = checkpointing.create_checkpoint_manager(exp.workdir, exp.config)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise checkpointing.CheckpointError(
      f"no checkpoint in {os.path.join(exp.workdir, 'checkpoints')}"
    )
  abstract, state_sharding = abstract_train_state(exp.method, exp.tx, exp.mesh, exp.config.seed)
  abstract = checkpointing.abstract_with_shardings(abstract, state_sharding)
  checkpointing.require_match(manager, step, abstract)
  return step, checkpointing.restore_state(manager, step, abstract).params


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, float]:
  """Evaluates the newest (or the given) checkpoint of a run on the held-out set."""
  exp = create_experiment(config, workdir)
  step, params = restore_params(exp, step)
  writer = progress.create_metric_writer(workdir)
  return run_eval(exp.evaluator(), params, step, workdir, writer)
