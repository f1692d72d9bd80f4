"""CLIP training: train state, the jitted step, and the loop.

Read top to bottom: TrainState -> train_step (masking -> towers -> InfoNCE -> AdamW) ->
Experiment (everything built from the config, validated before any compute) ->
create_train_state -> train_and_evaluate. Checkpoints live in checkpointing.py, the
progress log in progress.py.
"""

from __future__ import annotations

import dataclasses
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
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from vlp_jax import checkpointing, evaluation, masking, optim, progress, sharding
from vlp_jax.config_lib import ConfigError
from vlp_jax.evaluation import retrieval
from vlp_jax.input_pipeline import builtin, pipeline, records, tokenizers
from vlp_jax.losses import clip_loss
from vlp_jax.masking import show
from vlp_jax.models import CLIP, create_model

# Batch fields that go to the devices; the rest (record index, skip count) stay on the host.
MODEL_INPUTS = ("image", "tokens")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Base key; each step folds in its step number.
  nonfinite_streak: jax.Array  # Non-finite losses in a row (update skipped each time).
  nonfinite_total: jax.Array


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: CLIP,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  masker: masking.Masker,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; a non-finite loss leaves the state unchanged."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  keep_indices, mask_stats = masker(step_rng, batch["image"])

  def loss_fn(params):
    out = model.apply({"params": params}, batch["image"], batch["tokens"], keep_indices)
    loss, metrics = clip_loss(out["image"], out["text"], out["logit_scale"])
    return loss, {**metrics, "logit_scale": out["logit_scale"]}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_new = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = state.replace(
    step=state.step + 1,
    params=keep_new(params, state.params),
    opt_state=keep_new(opt_state, state.opt_state),
    nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
  )
  metrics.update({f"mask/{k}": v for k, v in mask_stats.items()})
  metrics.update(
    learning_rate=schedule(state.step),
    grad_norm=grad_norm,
    param_norm=optax.global_norm(state.params),
    update_norm=optax.global_norm(updates),
    nonfinite_streak=new_state.nonfinite_streak,
    nonfinite_total=new_state.nonfinite_total,
  )
  return new_state, metrics


@dataclasses.dataclass
class Experiment:
  """What a run is made of, built from the config before any device compute."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  tokenizer: tokenizers.WordPieceTokenizer
  model: CLIP
  train_shards: list[str]
  eval_shards: list[str]
  local_batch_size: int
  total_steps: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  masker: masking.Masker

  def train_dataset(self) -> grain.IterDataset:
    data = self.config.data
    return pipeline.create_train_dataset(
      self.train_shards,
      self.tokenizer,
      batch_size=self.local_batch_size,
      image_size=self.config.model.image.image_size,
      crop_scale=tuple(data.crop_scale),
      flip=data.flip,
      seed=self.config.seed,
      num_workers=data.num_workers,
      read_threads=data.read_threads,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  def evaluator(self) -> evaluation.RetrievalEvaluator:
    return evaluation.RetrievalEvaluator(
      self.model,
      self.mesh,
      self.eval_shards,
      self.tokenizer,
      batch_size=self.config.eval.batch_size,
      image_size=self.config.model.image.image_size,
      max_captions=self.config.eval.max_captions,
      read_threads=self.config.data.read_threads,
      name=self.config.data.eval or "builtin-heldout",
    )


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-probe-{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable: {e}") from e


def _resolve(key: str, spec: str) -> list[str]:
  try:
    return records.resolve_shards(spec)
  except FileNotFoundError as e:
    raise ConfigError(f"config.{key}: {e}") from e


def create_experiment(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Validates the config and builds mesh, data sources, tokenizer, model and optimizer.

  Fails with a ConfigError naming the offending key before anything is compiled.
  """
  mesh = sharding.create_mesh(config.mesh.to_dict())
  shards_per_batch = jax.process_count() * sharding.batch_size_divisor(mesh)
  if config.batch_size <= 0 or config.batch_size % shards_per_batch:
    raise ConfigError(
      f"config.batch_size={config.batch_size} must be a positive multiple of the "
      f"number of batch shards ({shards_per_batch} = processes x data x fsdp devices)"
    )
  if config.eval.batch_size <= 0 or config.eval.batch_size % shards_per_batch:
    raise ConfigError(
      f"config.eval.batch_size={config.eval.batch_size} must be a positive multiple of "
      f"{shards_per_batch}"
    )
  if config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f"config.init_from: {config.init_from!r} is not a directory")
  if config.total_steps < 0 or (config.total_steps == 0 and config.num_epochs <= 0):
    raise ConfigError("set config.total_steps > 0 or config.num_epochs > 0")
  _check_workdir(workdir)

  data = config.data
  if data.train:
    train_shards = _resolve("data.train", data.train)
    if not data.vocab_file:
      raise ConfigError("config.data.vocab_file is required when config.data.train is set")
    eval_spec = data.eval
    vocab_file = data.vocab_file
  else:
    logging.info("No config.data.train given: using the built-in dataset.")
    built = builtin.ensure_builtin(
      data.cache_dir or None,
      seed=data.builtin.seed,
      num_train=data.builtin.num_train,
      num_heldout=data.builtin.num_heldout,
      image_size=data.builtin.image_size,
      vocab_size=data.builtin.vocab_size,
    )
    train_shards = built.train_shards
    eval_spec = data.eval or ",".join(built.heldout_shards)
    vocab_file = data.vocab_file or built.vocab_file
  if not eval_spec:
    raise ConfigError("config.data.eval is required when config.data.train is set")
  eval_shards = _resolve("data.eval", eval_spec)
  if not os.path.isfile(vocab_file):
    raise ConfigError(f"config.data.vocab_file: {vocab_file!r} does not exist")
  tokenizer = tokenizers.create_tokenizer(
    vocab_file, config.model.text.context_length, data.lower_case
  )
  try:
    model = create_model(config.model, tokenizer.vocab_size)
    masker = masking.create_masker(
      config.masking,
      num_patches=model.visual.num_patches,
      patch_size=model.visual.size.patch_size,
      mean=model.visual.mean,
      std=model.visual.std,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e

  total_steps = config.total_steps
  if not total_steps:
    num_records = len(grain.sources.ArrayRecordDataSource(train_shards))
    total_steps = max(1, int(config.num_epochs * num_records // config.batch_size))
  schedule = optim.create_schedule(config.optim, total_steps)
  return Experiment(
    config=config,
    workdir=workdir,
    mesh=mesh,
    tokenizer=tokenizer,
    model=model,
    train_shards=train_shards,
    eval_shards=eval_shards,
    local_batch_size=config.batch_size // jax.process_count(),
    total_steps=total_steps,
    schedule=schedule,
    tx=optim.create_optimizer(config.optim, schedule),
    masker=masker,
  )


def _init_fn(model: CLIP, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  image_size = model.visual.image_size
  dummy_images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  dummy_tokens = jnp.zeros((1, model.text.context_length), jnp.int32)

  def init(rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, dummy_images, dummy_tokens)["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=state_rng,
      nonfinite_streak=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
    )

  return init


def abstract_train_state(
  model: CLIP, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, Any]:
  """Shapes and dtypes of the train state, and the shardings it is created with."""
  abstract = jax.eval_shape(_init_fn(model, tx), jax.random.PRNGKey(seed))
  return abstract, sharding.state_shardings(abstract, mesh)


def create_train_state(
  model: CLIP, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings (no full copy on one device)."""
  _, state_sharding = abstract_train_state(model, tx, mesh, seed)
  init = jax.jit(_init_fn(model, tx), out_shardings=state_sharding)
  return init(jax.random.PRNGKey(seed)), state_sharding


def compile_train_step(
  model: CLIP,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  masker: masking.Masker,
  mesh: Mesh,
  state_sharding: Any,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` jitted once with explicit shardings; the old state's buffers are donated."""
  return jax.jit(
    functools.partial(train_step, model=model, tx=tx, schedule=schedule, masker=masker),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def mask_picture(exp: Experiment, images: np.ndarray, step: int) -> np.ndarray:
  """(1, H, W, 3) uint8: the images with the patches the encoder drops (and the clusters)."""
  rng = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), step)
  rows = {"dropped": show.compute_masks(exp.masker, rng, images)}
  if isinstance(exp.masker, masking.ClusterMasking):
    rows["clusters"] = show.cluster_masks(exp.masker, rng, images)
  patch_size = exp.model.visual.size.patch_size
  return show.draw_mask_grid(images, list(rows.values()), list(rows), patch_size)[None]


def run_eval(
  evaluator: evaluation.RetrievalEvaluator,
  params: Any,
  step: int,
  workdir: str,
  writer: metric_writers.MetricWriter,
) -> dict[str, float]:
  metrics = evaluator.evaluate(params)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  progress.write_json(
    os.path.join(workdir, "eval_retrieval.json"),
    {"step": step, "task": "zeroshot_retrieval", "dataset": evaluator.name, "metrics": metrics},
  )
  logging.info("Held-out retrieval at step %d:\n%s", step, retrieval.format_table(metrics))
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in workdir) and returns final eval metrics."""
  exp = create_experiment(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = progress.create_metric_writer(workdir)
  state, state_sharding = create_train_state(exp.model, exp.tx, exp.mesh, config.seed)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info(
    "Model: %.2fM parameters; %d steps of batch %d on %d devices (mesh %s)",
    num_params / 1e6,
    exp.total_steps,
    config.batch_size,
    jax.device_count(),
    dict(exp.mesh.shape),
  )

  train_iter = iter(exp.train_dataset())
  manager = checkpointing.create_checkpoint_manager(workdir, config)
  if (latest := manager.latest_step()) is not None:
    logging.info("Resuming from the checkpoint of step %d", latest)
    state = checkpointing.restore_state(
      manager, latest, checkpointing.abstract_with_shardings(state, state_sharding), train_iter
    )
  elif config.init_from:
    logging.info("Initialising the parameters from %s", config.init_from)
    abstract = checkpointing.abstract_with_shardings(state, state_sharding)
    state = state.replace(params=checkpointing.load_params(config.init_from, abstract))

  step_fn = compile_train_step(
    exp.model, exp.tx, exp.schedule, exp.masker, exp.mesh, state_sharding
  )
  evaluator = exp.evaluator()
  eval_metrics: dict[str, float] = {}
  try:
    eval_metrics = _train_loop(exp, state, step_fn, train_iter, manager, evaluator, writer)
  finally:
    manager.wait_until_finished()
    writer.flush()
    if hasattr(train_iter, "close"):
      train_iter.close()  # Stops grain's worker processes and frees their shared memory.
  return eval_metrics


def _train_loop(
  exp: Experiment,
  state: TrainState,
  step_fn: Any,
  train_iter: grain.DatasetIterator,
  manager: ocp.CheckpointManager,
  evaluator: evaluation.RetrievalEvaluator,
  writer: metric_writers.MetricWriter,
) -> dict[str, float]:
  config, workdir = exp.config, exp.workdir
  start_step = int(state.step)
  log = progress.ProgressLog(writer, exp, start_step)
  stop_step = start_step + config.stop_after_steps if config.stop_after_steps else None
  eval_metrics: dict[str, float] = {}
  for step in range(start_step + 1, exp.total_steps + 1):
    host_batch = next(train_iter)
    device_batch = {k: host_batch[k] for k in MODEL_INPUTS}
    state, metrics = step_fn(state, sharding.host_to_global(device_batch, exp.mesh))
    last_step = step == exp.total_steps or step == stop_step
    log.add(metrics, int(host_batch["skipped"].sum()))
    if step % config.log_every_steps == 0 or last_step:
      log.check_health(config, log.flush(step))
    show_every = config.masking.show_every_steps
    if show_every and step % show_every == 0 and jax.process_index() == 0:
      writer.write_images(step, {"masks": mask_picture(exp, host_batch["image"][:8], step)})
    if step % config.checkpoint_every_steps == 0 or last_step:
      manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)
        ),
        force=True,
      )
    if (config.eval.every_steps and step % config.eval.every_steps == 0) or last_step:
      eval_start = time.time()
      eval_metrics = run_eval(evaluator, state.params, step, workdir, writer)
      log.paused += time.time() - eval_start
    if step == stop_step:
      logging.info(
        "Stopping after %d steps of this run (config.stop_after_steps)", config.stop_after_steps
      )
      return eval_metrics
  if not eval_metrics:  # Resumed at the end: evaluate the final state anyway.
    eval_metrics = run_eval(evaluator, state.params, exp.total_steps, workdir, writer)
  return eval_metrics


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, float]:
  """Evaluates the newest (or the given) checkpoint of a run on the held-out set."""
  exp = create_experiment(config, workdir)
  manager = checkpointing.create_checkpoint_manager(workdir, config)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  abstract, state_sharding = abstract_train_state(exp.model, exp.tx, exp.mesh, config.seed)
  state = checkpointing.restore_state(
    manager, step, checkpointing.abstract_with_shardings(abstract, state_sharding)
  )
  writer = progress.create_metric_writer(workdir)
  return run_eval(exp.evaluator(), state.params, step, workdir, writer)
