"""Everything a run is made of, built and validated from the config before any compute:
mesh, data sources, tokenizer, method, schedule and optimizer.

`create_experiment` fails with a ConfigError naming the offending key; nothing here
compiles or initialises parameters.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from vlp_jax import config_lib, evaluation, methods, optim, pretrained, sharding
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import common, run_config
from vlp_jax.input_pipeline import builtin, pipeline, records, tokenizers
from vlp_jax.methods import Method, MethodContext


@dataclasses.dataclass(frozen=True)
class StepParts:
  """What the train step is made of (benchmarks build these without data)."""

  method: Method
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  mesh: Mesh
  batch_size: int  # Global.

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of the global batch the step receives."""
    batch_sharding = sharding.batch_sharding(self.mesh)
    return {
      name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding)
      for name, x in self.method.batch_spec(self.batch_size).items()
    }

  @property
  def batch_fields(self) -> tuple[str, ...]:
    """The batch fields that go to the devices (the rest, e.g. skip counts, stay)."""
    return tuple(self.method.batch_spec(self.batch_size))


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """What building a method needs of a tokenizer, for runs without one (benchmarks)."""

  vocab_size: int
  pad_id: int
  context_length: int
  # BERT's special ids, for methods with masked language modelling (ALBEF, VLC).
  cls_id: int | None = None
  sep_id: int | None = None
  mask_id: int | None = None


def create_step_parts(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  tokenizer: tokenizers.Tokenizer | TokenizerSpec,
  total_steps: int,
  train_sets: tuple[records.ShardSet, ...] = (),
) -> StepParts:
  """The method of config.method, its schedule and optimizer (ValueError naming a key)."""
  method = methods.create_method(MethodContext(config, mesh, tokenizer, total_steps, train_sets))
  schedule = optim.create_schedule(config.optim, total_steps)
  tx = optim.create_optimizer(
    config.optim, schedule, method.param_labels(), method.optimizer_groups(schedule)
  )
  return StepParts(method, schedule, tx, mesh, config.batch_size)


@dataclasses.dataclass(frozen=True)
class Experiment(StepParts):
  """A run: its step parts plus config, workdir, data and tokenizer."""

  config: ml_collections.ConfigDict = None  # type: ignore[assignment]
  workdir: str = ""
  tokenizer: tokenizers.Tokenizer = None  # type: ignore[assignment]
  train_sets: tuple[records.ShardSet, ...] = ()  # Training shard sets and their weights.
  eval_shards: tuple[str, ...] = ()
  local_batch_size: int = 0
  total_steps: int = 0
  vocab_file: str = ""  # The tokenizer's file (recorded in tokenizer.json for export).

  def train_dataset(self, extension: pipeline.RowExtension | None = None) -> grain.IterDataset:
    """This process's training batches; `extension` adds a method's fields per row."""
    data = self.config.data
    return pipeline.create_train_dataset(
      list(self.train_sets),
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
      extension=extension,
    )

  def evaluator(
    self, tasks: list[str] | None = None, show_progress: bool = False
  ) -> evaluation.Evaluator:
    """The evaluation tasks (default config.eval.tasks) over the method's predictions."""
    return evaluation.create_evaluator(
      self.config,
      self.method.predict_fns(),
      self.mesh,
      self.tokenizer,
      list(self.eval_shards),
      tasks=tasks,
      show_progress=show_progress,
      run_config=run_config.from_values,
      model_name=self.method.model_name,
    )

  def tokenizer_info(self) -> dict[str, Any]:
    """What exporting the run needs of its tokenizer: kind, vocab size, pad and end ids."""
    ids = np.asarray(self.tokenizer([""]))[0]
    return {
      "kind": self.config.data.tokenizer,
      "vocab_size": self.tokenizer.vocab_size,
      "pad_id": self.tokenizer.pad_id,
      "eos_id": int(ids[ids != self.tokenizer.pad_id][-1]),
      "vocab_file": os.path.abspath(self.vocab_file),
      "lower_case": self.config.data.lower_case,
    }


def check_writable_dir(path: str, name: str) -> None:
  """ConfigError naming `name` unless `path` is (or can be made) a directory this process
  can write: checked before any compute, so no finished work is lost to it."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-probe-{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"{name} {path!r} is not writable: {e}") from e


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


def _check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
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


def _check_method_blocks(config: ml_collections.ConfigDict) -> None:
  """The blocks config.method reads are there, and no other method's: a config built for
  one method and switched by --config.method=... fails here, naming the block."""
  own = {block.name for block in methods.config_blocks(config.method)}
  for name, owners in methods.block_owners().items():
    if name in own and name not in config:
      raise ConfigError(
        f"config.method={config.method!r} reads config.{name}, which this config lacks: "
        "choose the method in the config file (e.g. configs/demo.py:method="
        f"{config.method}) or build it with vlp_jax.configs.common.base_config / use_method"
      )
    if name not in own and name in config:
      raise ConfigError(
        f"config.{name} is a block of config.method {' / '.join(owners)}, not of "
        f"{config.method!r}: choose the method in the config file (or use_method), which "
        "leaves out the blocks the method does not read"
      )


def create_mesh(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """The mesh of config.mesh over `devices`: this run's (jax.devices()) by default, or a
  named topology's (vlp_jax.topology) for a deviceless pre-flight compile."""
  try:
    return sharding.create_mesh(config.mesh.to_dict(), devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_step_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """What the step needs of the config, checked before any compute (ConfigError naming
  the key): the method and its config blocks, the rules of the base config
  (vlp_jax/configs) and of the method's blocks, the batch sizes over `mesh`."""
  if config.method not in methods.METHODS:
    raise ConfigError(f"config.method={config.method!r} is not one of {sorted(methods.METHODS)}")
  _check_method_blocks(config)
  config_lib.check_rules(config, common.config_rules(config.method))
  if config.loss.kind == "negclip":
    raise ConfigError("config.loss.kind='negclip' is now config.method='negclip'")
  _check_batch_sizes(config, mesh)


def _data_and_tokenizer(
  config: ml_collections.ConfigDict, workdir: str, init_specs: list[pretrained.InitSpec]
) -> tuple[list[records.ShardSet], list[str], tokenizers.Tokenizer, str]:
  """Training shard sets, held-out shards, tokenizer and its file, from config.data (the
  built-in dataset without config.data.train) and the pretrained towers' vocabulary."""
  data = config.data
  pretrained_vocab = pretrained.text_vocab_file(init_specs)
  builtin_vocab = None
  if data.train:
    train_sets = _resolve_mixture(data.train)
    try:
      vocab_file = (
        data.vocab_file or pretrained_vocab or tokenizers.default_vocab_file(data.tokenizer)
      )
      if not vocab_file and data.tokenizer == "wordpiece":
        # Learned once from the training captions, kept (and reused) in the workdir.
        shards = [path for shard_set in train_sets for path in shard_set.shards]
        vocab_file = tokenizers.ensure_learned_vocab(workdir, shards, lower_case=data.lower_case)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    if not vocab_file:
      raise ConfigError(
        f"config.data.vocab_file is required for config.data.tokenizer={data.tokenizer!r}"
      )
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
    try:
      default_vocab = tokenizers.default_vocab_file(data.tokenizer)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    vocab_file = data.vocab_file or pretrained_vocab or default_vocab or builtin_vocab
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
  return train_sets, eval_shards, tokenizer, vocab_file


def _total_steps(config: ml_collections.ConfigDict, train_sets: list[records.ShardSet]) -> int:
  """config.total_steps, or num_epochs over the training sets; fails where a set is smaller
  than a global batch (one set) or empty (a mixture)."""
  set_sizes = [len(grain.sources.ArrayRecordDataSource(list(s.shards))) for s in train_sets]
  for shard_set, size in zip(train_sets, set_sizes):
    needed = config.batch_size if len(train_sets) == 1 else 1
    if size < needed:
      raise ConfigError(
        f"config.data.train: {shard_set.spec!r} has {size} records, fewer than "
        f"{'a global batch of ' if needed > 1 else ''}{needed}"
      )
  total_steps = config.total_steps
  if not total_steps:
    # An epoch is one pass over the records of every set, whatever the weights.
    total_steps = max(1, int(config.num_epochs * sum(set_sizes) // config.batch_size))
  return total_steps


def create_experiment(
  config: ml_collections.ConfigDict,
  workdir: str,
  devices: Sequence[jax.Device] | None = None,
) -> Experiment:
  """Validates the config and builds mesh (over `devices`, default all of this run's),
  data sources, tokenizer, method and optimizer.

  Fails with a ConfigError naming the offending key before anything is compiled.
  """
  mesh = create_mesh(config, devices)
  check_step_config(config, mesh)
  if config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f"config.init_from: {config.init_from!r} is not a directory")
  init_specs = pretrained.parse_specs(config)
  if config.total_steps < 0 or (config.total_steps == 0 and config.num_epochs <= 0):
    raise ConfigError("set config.total_steps > 0 or config.num_epochs > 0")
  check_writable_dir(workdir, "workdir")

  train_sets, eval_shards, tokenizer, vocab_file = _data_and_tokenizer(config, workdir, init_specs)
  total_steps = _total_steps(config, train_sets)
  try:
    parts = create_step_parts(config, mesh, tokenizer, total_steps, tuple(train_sets))
    predictions = parts.method.predict_fns()
    evaluation.check_servable(
      evaluation.task_names(config.eval.tasks), list(predictions), config.method
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return Experiment(
    # Field by field: dataclasses.asdict would also turn the flax modules into dicts.
    **{field.name: getattr(parts, field.name) for field in dataclasses.fields(parts)},
    config=config,
    workdir=workdir,
    tokenizer=tokenizer,
    train_sets=tuple(train_sets),
    eval_shards=tuple(eval_shards),
    local_batch_size=config.batch_size // jax.process_count(),
    total_steps=total_steps,
    vocab_file=vocab_file,
  )
