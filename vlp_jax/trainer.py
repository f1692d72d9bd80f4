"""CLIP training: train state, the jitted step, and the loop.

Read top to bottom: TrainState -> train_step (masking -> towers -> InfoNCE -> AdamW) ->
Experiment (everything built from the config, validated before any compute) ->
create_train_state -> train_and_evaluate. Checkpoints live in checkpointing.py, the
progress log in progress.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlp_jax import (
  checkpointing,
  evaluation,
  losses,
  masking,
  negclip,
  optim,
  peft,
  preemption,
  pretrained,
  progress,
  sharding,
)
from vlp_jax.config_lib import ConfigError
from vlp_jax.input_pipeline import builtin, pipeline, records, tokenizers
from vlp_jax.masking import show
from vlp_jax.models import CLIP, create_model


@dataclasses.dataclass(frozen=True)
class BatchFields:
  """Batch fields that go to the devices (the rest, e.g. skip counts, stay on the host).

  The step concatenates the image fields, and the token fields, in this order: NegCLIP's
  [images; hard images] (2B) and [captions; hard captions; negatives; hard negatives] (4B).
  """

  images: tuple[str, ...] = ("image",)
  texts: tuple[str, ...] = ("tokens",)

  @property
  def names(self) -> tuple[str, ...]:
    return self.images + self.texts

  def model_inputs(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    concat = lambda names: jnp.concatenate([jnp.asarray(batch[n]) for n in names])  # noqa: E731
    return {"image": concat(self.images), "tokens": concat(self.texts)}


CLIP_FIELDS = BatchFields()
NEGCLIP_FIELDS = BatchFields(negclip.IMAGE_FIELDS, negclip.TOKEN_FIELDS)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Base key; each step folds in its step number.
  nonfinite_streak: jax.Array  # Non-finite losses in a row (update skipped each time).
  nonfinite_total: jax.Array


def _loss_and_grads(
  params: Any,
  batch: dict[str, jax.Array],
  keep_indices: jax.Array | None,
  *,
  model: CLIP,
  loss_fn: losses.LossFn,
  freeze: Callable[[Any], Any],
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
  def compute(params):
    variables = {"params": freeze(params)}
    out = model.apply(variables, batch["image"], batch["tokens"], keep_indices)
    loss, metrics = loss_fn(out["image"], out["text"], out["logit_scale"], out.get("logit_bias"))
    return loss, {**metrics, "logit_scale": out["logit_scale"]}

  return jax.value_and_grad(compute, has_aux=True)(params)


def _accumulated_loss_and_grads(
  params: Any,
  batch: dict[str, jax.Array],
  keep_indices: jax.Array | None,
  *,
  model: CLIP,
  loss_fn: losses.LossFn,
  freeze: Callable[[Any], Any],
  num_microbatches: int,
  mesh: Mesh,
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
  """The loss and gradients of the whole batch, holding one microbatch's activations.

  Negatives come from the whole batch (as GradCache does): (1) embed every microbatch
  without gradients; (2) the loss over all embeddings and its gradients with respect to
  them; (3) re-run each microbatch and backpropagate its slice of those gradients. Costs
  one extra forward pass; equals the single-pass result up to float summation order.
  """
  inputs = {"image": batch["image"], "tokens": batch["tokens"]}
  if keep_indices is not None:
    inputs["keep"] = keep_indices
  k = num_microbatches
  micro_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.batch_axes(mesh)))

  def split(x):
    # Microbatch j holds rows j, j + k, ...: every device keeps its own rows.
    x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def merge(x):
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

  def embed(params, micro):
    variables = {"params": freeze(params)}
    image = model.apply(variables, micro["image"], micro.get("keep"), method=CLIP.encode_image)
    text = model.apply(variables, micro["tokens"], method=CLIP.encode_text)
    return image, text

  micro = jax.tree.map(split, inputs)
  _, (images, texts) = jax.lax.scan(lambda c, m: (c, embed(params, m)), None, micro)

  def batch_loss(params, images, texts):
    temperature = model.apply({"params": params}, method=CLIP.temperature)
    scale = temperature["logit_scale"]
    loss, metrics = loss_fn(images, texts, scale, temperature.get("logit_bias"))
    return loss, {**metrics, "logit_scale": scale}

  (loss, metrics), (grads, image_grads, text_grads) = jax.value_and_grad(
    batch_loss, argnums=(0, 1, 2), has_aux=True
  )(params, merge(images), merge(texts))

  def backprop(grads, xs):
    micro, image_grad, text_grad = xs
    _, vjp = jax.vjp(lambda p: embed(p, micro), params)
    (micro_grads,) = vjp((image_grad, text_grad))
    return jax.tree.map(jnp.add, grads, micro_grads), None

  grads, _ = jax.lax.scan(backprop, grads, (micro, split(image_grads), split(text_grads)))
  return (loss, metrics), grads


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: CLIP,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  masker: masking.Masker,
  loss_fn: losses.LossFn = losses.clip_loss,
  param_labels: Callable[[Any], Any] | None = None,
  fields: BatchFields = CLIP_FIELDS,
  grad_accum_steps: int = 1,
  mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; a non-finite loss leaves the state unchanged.

  `param_labels` (peft.labeler): frozen parameters get no gradient computation.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  batch = fields.model_inputs(batch)
  if param_labels is None:
    freeze = lambda params: params  # noqa: E731
  else:
    freeze = lambda params: peft.freeze_gradients(params, param_labels(params))  # noqa: E731
  keep_indices, mask_stats = masker(step_rng, batch["image"])
  if grad_accum_steps > 1:
    (loss, metrics), grads = _accumulated_loss_and_grads(
      state.params,
      batch,
      keep_indices,
      model=model,
      loss_fn=loss_fn,
      freeze=freeze,
      num_microbatches=grad_accum_steps,
      mesh=mesh,
    )
  else:
    (loss, metrics), grads = _loss_and_grads(
      state.params, batch, keep_indices, model=model, loss_fn=loss_fn, freeze=freeze
    )
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
  tokenizer: tokenizers.Tokenizer
  model: CLIP
  train_sets: list[records.ShardSet]  # Training shard sets and their mixing weights.
  eval_shards: list[str]
  local_batch_size: int
  total_steps: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  masker: masking.Masker
  loss_fn: losses.LossFn
  param_labels: Callable[[Any], Any] | None
  fields: BatchFields
  init_specs: list[pretrained.InitSpec]  # Pretrained towers for a fresh run.
  tagger: negclip.Tagger | None  # NegCLIP's part-of-speech tagger (loss.kind "negclip").

  def train_dataset(self, negclip_spec: negclip.NegClipSpec | None = None) -> grain.IterDataset:
    """The training batches; NegCLIP's (`negclip_spec`) add hard images and negatives."""
    data = self.config.data
    return pipeline.create_train_dataset(
      self.train_sets,
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
      negclip=negclip_spec,
    )

  def negclip_spec(self, params: Any, embedder: evaluation.Embedder) -> negclip.NegClipSpec | None:
    """For loss.kind "negclip": the workdir's hard-image neighbours, mined with `params`
    (the model about to be fine-tuned) the first time. Every process calls it."""
    if self.config.loss.kind != "negclip":
      return None
    neighbours = negclip.load_or_mine_hard_images(
      self.workdir,
      functools.partial(embedder.images, params),
      list(self.train_sets[0].shards),
      block_size=self.config.negclip.block_size,
    )
    return negclip.NegClipSpec(neighbours, self.tagger)

  def compile_step(
    self, state_sharding: Any, grad_accum_steps: int | None = None
  ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted train step of this experiment (accumulation from the config by default)."""
    return compile_parts(
      self, self.mesh, state_sharding, grad_accum_steps or self.config.grad_accum_steps
    )

  def evaluator(self) -> evaluation.Evaluator:
    return evaluation.create_evaluator(
      self.config, self.model, self.mesh, self.tokenizer, self.eval_shards
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
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.{key}: {e}") from e


def _resolve_mixture(spec: str | list[str]) -> list[records.ShardSet]:
  try:
    return records.resolve_mixture(spec)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.data.train: {e}") from e


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
  accum = config.grad_accum_steps
  if accum < 1 or config.batch_size % (shards_per_batch * accum):
    raise ConfigError(
      f"config.grad_accum_steps={accum}: every batch shard ({config.batch_size} / "
      f"{shards_per_batch} rows) must split into {accum} equal microbatches"
    )
  if config.eval.batch_size <= 0 or config.eval.batch_size % shards_per_batch:
    raise ConfigError(
      f"config.eval.batch_size={config.eval.batch_size} must be a positive multiple of "
      f"{shards_per_batch}"
    )
  if config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f"config.init_from: {config.init_from!r} is not a directory")
  init_specs = pretrained.parse_specs(config)
  if config.total_steps < 0 or (config.total_steps == 0 and config.num_epochs <= 0):
    raise ConfigError("set config.total_steps > 0 or config.num_epochs > 0")
  _check_workdir(workdir)

  data = config.data
  pretrained_vocab = pretrained.text_vocab_file(init_specs)
  builtin_vocab = None
  if data.train:
    train_sets = _resolve_mixture(data.train)
    vocab_file = data.vocab_file or pretrained_vocab
    if not vocab_file:
      raise ConfigError("config.data.vocab_file is required when config.data.train is set")
    eval_spec = data.eval
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
    train_sets = [records.ShardSet("builtin", tuple(built.train_shards))]
    eval_spec = data.eval or ",".join(built.heldout_shards)
    builtin_vocab = built.vocab_file
    vocab_file = data.vocab_file or pretrained_vocab or builtin_vocab
  if not eval_spec:
    raise ConfigError("config.data.eval is required when config.data.train is set")
  eval_shards = _resolve("data.eval", eval_spec)
  if not os.path.isfile(vocab_file):
    raise ConfigError(f"config.data.vocab_file: {vocab_file!r} does not exist")
  if data.tokenizer != "wordpiece" and vocab_file == builtin_vocab:
    raise ConfigError(
      f"config.data.tokenizer={data.tokenizer!r} needs config.data.vocab_file (the built-in "
      "dataset's own vocab is WordPiece)"
    )
  try:
    tokenizer = tokenizers.create_tokenizer(
      data.tokenizer, vocab_file, config.model.text.context_length, data.lower_case
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  tagger = None
  if config.loss.kind == "negclip":
    if len(train_sets) != 1:
      raise ConfigError("config.data.train: NegCLIP mines hard images in one shard set, not a mix")
    try:
      tagger = negclip.create_tagger(config.negclip.tagger)
    except (ValueError, ImportError) as e:
      raise ConfigError(f"config.negclip.tagger: {e}") from e
  total_steps = config.total_steps
  if not total_steps:
    # An epoch is one pass over the records of every set, whatever the weights.
    num_records = sum(len(grain.sources.ArrayRecordDataSource(list(s.shards))) for s in train_sets)
    total_steps = max(1, int(config.num_epochs * num_records // config.batch_size))
  try:
    parts = create_step_parts(config, mesh, tokenizer.vocab_size, tokenizer.pad_id, total_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return Experiment(
    config=config,
    workdir=workdir,
    mesh=mesh,
    tokenizer=tokenizer,
    train_sets=train_sets,
    eval_shards=eval_shards,
    local_batch_size=config.batch_size // jax.process_count(),
    total_steps=total_steps,
    init_specs=init_specs,
    tagger=tagger,
    # Field by field: dataclasses.asdict would also turn the flax modules into dicts.
    **{field.name: getattr(parts, field.name) for field in dataclasses.fields(parts)},
  )


@dataclasses.dataclass(frozen=True)
class StepParts:
  """What the train step is made of: model, masker, loss, schedule and optimizer."""

  model: CLIP
  masker: masking.Masker
  loss_fn: losses.LossFn
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  # params -> "train"/"freeze" tree (config.peft); None: everything trains.
  param_labels: Callable[[Any], Any] | None
  fields: BatchFields  # What the step reads from a batch.


def create_step_parts(
  config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int, pad_id: int, total_steps: int
) -> StepParts:
  """Builds the step's parts from the config (raises ValueError naming a bad key)."""
  tuning = peft.tuning_from_config(config.peft)
  model = create_model(config.model, vocab_size, pad_id, loss_kind=config.loss.kind, tuning=tuning)
  masker = masking.create_masker(
    config.masking,
    num_patches=model.visual.num_patches,
    patch_size=model.visual.size.patch_size,
    mean=model.visual.mean,
    std=model.visual.std,
  )
  schedule = optim.create_schedule(config.optim, total_steps)
  # "all" trains everything: plain AdamW, no labels (and the unchanged optimizer state).
  everything = set(peft.tower_modes(config.peft).values()) == {"all"}
  param_labels = None if everything and not config.peft.train_also else peft.labeler(config.peft)
  return StepParts(
    model=model,
    masker=masker,
    loss_fn=losses.create_loss(config.loss, mesh),
    schedule=schedule,
    tx=optim.create_optimizer(config.optim, schedule, param_labels),
    param_labels=param_labels,
    fields=NEGCLIP_FIELDS if config.loss.kind == "negclip" else CLIP_FIELDS,
  )


def compile_parts(
  parts: StepParts | Experiment, mesh: Mesh, state_sharding: Any, grad_accum_steps: int = 1
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """`compile_train_step` with the model, optimizer, masker, loss, labels and batch fields
  of `parts` (a StepParts, or an Experiment, which carries the same fields)."""
  return compile_train_step(
    parts.model,
    parts.tx,
    parts.schedule,
    parts.masker,
    mesh,
    state_sharding,
    loss_fn=parts.loss_fn,
    param_labels=parts.param_labels,
    fields=parts.fields,
    grad_accum_steps=grad_accum_steps,
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
  *,
  loss_fn: losses.LossFn = losses.clip_loss,
  param_labels: Callable[[Any], Any] | None = None,
  fields: BatchFields = CLIP_FIELDS,
  grad_accum_steps: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` jitted once with explicit shardings; the old state's buffers are donated."""
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    schedule=schedule,
    masker=masker,
    loss_fn=loss_fn,
    param_labels=param_labels,
    fields=fields,
    grad_accum_steps=grad_accum_steps,
    mesh=mesh,
  )
  return jax.jit(
    step,
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def _abstract_batch(exp: Experiment) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and shardings of the global batch the step receives."""
  size, context = exp.model.visual.image_size, exp.tokenizer.context_length
  batch_sharding = sharding.batch_sharding(exp.mesh)
  batch = exp.config.batch_size
  image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=batch_sharding)
  tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=batch_sharding)
  return {
    **{name: image for name in exp.fields.images},
    **{name: tokens for name in exp.fields.texts},
  }


def mask_picture(exp: Experiment, images: np.ndarray, step: int) -> np.ndarray:
  """(1, H, W, 3) uint8: the images with the patches the encoder drops (and the clusters)."""
  rng = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), step)
  rows = {"dropped": show.compute_masks(exp.masker, rng, images)}
  if isinstance(exp.masker, masking.ClusterMasking):
    rows["clusters"] = show.cluster_masks(exp.masker, rng, images)
  patch_size = exp.model.visual.size.patch_size
  return show.draw_mask_grid(images, list(rows.values()), list(rows), patch_size)[None]


def run_eval(
  evaluator: evaluation.Evaluator,
  params: Any,
  step: int,
  workdir: str,
  writer: metric_writers.MetricWriter,
) -> dict[str, float]:
  """Runs config.eval.tasks, writes <workdir>/eval/ and returns held-out retrieval metrics."""
  results = evaluator.evaluate(params)
  evaluation.log_and_write(results, step, workdir, writer, model=evaluator.model_name)
  return evaluation.heldout_metrics(results)


def tokenizer_info(tokenizer: tokenizers.Tokenizer, kind: str) -> dict[str, Any]:
  """What exporting a run needs of its tokenizer: kind, vocabulary size, pad and end ids."""
  ids = np.asarray(tokenizer([""]))[0]
  return {
    "kind": kind,
    "vocab_size": tokenizer.vocab_size,
    "pad_id": tokenizer.pad_id,
    "eos_id": int(ids[ids != tokenizer.pad_id][-1]),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in workdir) and returns final eval metrics."""
  exp = create_experiment(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "tokenizer.json"), "w") as f:  # For weight export.
      json.dump(tokenizer_info(exp.tokenizer, config.data.tokenizer), f, indent=2)
  writer = progress.create_metric_writer(workdir)
  state, state_sharding = create_train_state(exp.model, exp.tx, exp.mesh, config.seed)
  trainable, num_params = peft.count(state.params, exp.param_labels)
  modes = peft.tower_modes(config.peft)
  logging.info(
    "Model: %.2fM parameters, %.2fM trainable (%.2f%%; image tower %s, text tower %s); "
    "%d steps of batch %d on %d devices (mesh %s)",
    num_params / 1e6,
    trainable / 1e6,
    100 * trainable / num_params,
    modes["visual"],
    modes["text"],
    exp.total_steps,
    config.batch_size,
    jax.device_count(),
    dict(exp.mesh.shape),
  )

  manager = checkpointing.create_checkpoint_manager(workdir, config)
  abstract_state = checkpointing.abstract_with_shardings(state, state_sharding)
  fresh = manager.latest_step() is None
  if fresh:  # Before the data: NegCLIP mines hard images with the starting parameters.
    state = _initialise_params(exp, state, abstract_state, state_sharding)
  evaluator = exp.evaluator()
  train_iter = iter(exp.train_dataset(exp.negclip_spec(state.params, evaluator.embedder)))
  if restored := checkpointing.restore_newest_good(manager, abstract_state, train_iter):
    logging.info("Resuming from the checkpoint of step %d", restored[0])
    state = restored[1]
  elif not fresh:  # Checkpoints exist but none is readable: start over.
    state = _initialise_params(exp, state, abstract_state, state_sharding)

  step_fn = exp.compile_step(state_sharding)
  # Compiled ahead of the loop: one compilation, whose cost analysis gives the MFU.
  step_fn = step_fn.lower(state, _abstract_batch(exp)).compile()
  eval_metrics: dict[str, float] = {}
  try:
    with preemption.PreemptionWatcher() as watcher:
      eval_metrics = _train_loop(
        exp, state, step_fn, train_iter, manager, evaluator, writer, watcher
      )
  finally:
    manager.wait_until_finished()
    writer.flush()
    if hasattr(train_iter, "close"):
      train_iter.close()  # Stops grain's worker processes and frees their shared memory.
  return eval_metrics


def _initialise_params(
  exp: Experiment, state: TrainState, abstract_state: TrainState, state_sharding: Any
) -> TrainState:
  """A fresh run's parameters: config.init_from's run, or the pretrained towers."""
  if exp.config.init_from:
    logging.info("Initialising the parameters from %s", exp.config.init_from)
    return state.replace(params=checkpointing.load_params(exp.config.init_from, abstract_state))
  if exp.init_specs:
    host_params = multihost_utils.process_allgather(state.params, tiled=True)
    params = pretrained.load(exp.init_specs, host_params)
    return state.replace(params=sharding.host_tree_to_global(params, state_sharding.params))
  return state


def _train_loop(
  exp: Experiment,
  state: TrainState,
  step_fn: Any,
  train_iter: grain.DatasetIterator,
  manager: ocp.CheckpointManager,
  evaluator: evaluation.Evaluator,
  writer: metric_writers.MetricWriter,
  watcher: preemption.PreemptionWatcher,
) -> dict[str, float]:
  config, workdir = exp.config, exp.workdir
  start_step = int(state.step)
  log = progress.ProgressLog(
    writer, exp, start_step, progress.compiled_flops(step_fn, exp.mesh.size)
  )
  stop_step = start_step + config.stop_after_steps if config.stop_after_steps else None
  eval_metrics: dict[str, float] = {}
  profile_last = config.profile_first_step + config.profile_num_steps - 1
  tracing = False
  for step in range(start_step + 1, exp.total_steps + 1):
    if config.profile_first_step and step == config.profile_first_step:
      jax.profiler.start_trace(workdir)  # Open with TensorBoard's profile tab.
      tracing = True
    host_batch = next(train_iter)
    device_batch = {k: host_batch[k] for k in exp.fields.names}
    state, metrics = step_fn(state, sharding.host_to_global(device_batch, exp.mesh))
    last_step = step == exp.total_steps or step == stop_step
    if tracing and (step >= profile_last or last_step):
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      tracing = False
    log.add(metrics, int(host_batch["skipped"].sum()))
    if step % config.log_every_steps == 0 or last_step:
      log.check_health(config, log.flush(step))
    show_every = config.masking.show_every_steps
    if show_every and step % show_every == 0 and jax.process_index() == 0:
      writer.write_images(step, {"masks": mask_picture(exp, host_batch["image"][:8], step)})
    preempted = watcher.should_stop(step)  # Every step: multi-host agreement needs it.
    if step % config.checkpoint_every_steps == 0 or last_step or preempted:
      manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)
        ),
        force=True,
      )
    if preempted:
      logging.warning("Preempted: saved the checkpoint of step %d; exiting.", step)
      return eval_metrics
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
