"""Fine-tuning a VLC run on a downstream task: what the four task methods share
(vlc_vqa.py, vlc_nlvr2.py, vlc_retrieval.py, vlc_classify.py; config.method "vlc_<task>",
their options in config.finetune: vlc_finetune_config.py), as the VLC reference code
fine-tunes.

Nothing is masked when fine-tuning. Every parameter trains in one group with layer-wise
lr decay (methods/vlc.py, VLC's param_groups_lrd: block i at lr * decay ** (depth - i));
a task's new heads can get an extra lr multiplier, and parts it keeps as pretrained
(retrieval's ITM head) get none. A task reads its own training data (`train_data`,
config.finetune.train, input_pipeline/finetune_data.py) or trains on the image-text
shards of config.data.train (retrieval). `pretrained_params` loads the encoder and
pooler (and what a task adds: `transfer_pretrained`) of config.finetune.pretrained's
newest checkpoint.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from vlp_jax.config_lib import ConfigError
from vlp_jax.input_pipeline import image_files
from vlp_jax.input_pipeline.finetune_data import BuiltinSets
from vlp_jax.methods import vlc
from vlp_jax.methods.base import Batch, DataContext, Extra, Method, MethodContext, Metrics, Params
from vlp_jax.models.single_stream import IMAGE_TYPE, SingleStreamEncoder

NO_PRETRAINED = "none"  # config.finetune.pretrained: random initialisation, on purpose.
TRAIN_KEY = "config.finetune.train"
INIT = nn.initializers.normal(0.02)  # ViLT's init_weights for its heads.

# ---------------------------------------------------------------- model


class ClassifierMlp(nn.Module):
  """ViLT's vqa / nlvr2 classifier: Dense(hidden) -> LayerNorm -> GELU -> Dense(outputs)."""

  hidden: int
  outputs: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=INIT, name="dense_0")(x)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln")(x)  # torch's default eps.
    x = nn.gelu(x, approximate=False)  # torch.nn.GELU: exact.
    return nn.Dense(self.outputs, dtype=self.dtype, kernel_init=INIT, name="dense_1")(x)


class FinetuneModel(nn.Module):
  """A VLC encoder (named as models.single_stream.SingleStream names it, so a pretraining
  run's parameters copy over) and a task's head; `num_outputs`: VQA answers or classes."""

  encoder: SingleStreamEncoder
  num_outputs: int = 0

  def init_params(self, rng: jax.Array, text_length: int) -> Params:
    size = self.encoder.image_size
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    tokens = jnp.zeros((1, text_length), jnp.int32)
    return self.init(rng, images, tokens, method=type(self).every_head)["params"]

  def every_head(self, images: jax.Array, tokens: jax.Array) -> Any:
    """Uses every parameter (for init)."""
    return self(images, tokens)


class PooledModel(FinetuneModel):
  """FinetuneModel with ViLT's pooler over the first token (the text's [CLS])."""

  def setup(self) -> None:
    width, dtype = self.encoder.size.width, self.encoder.dtype
    self.pooler = nn.Dense(width, dtype=dtype, kernel_init=INIT)

  def pooled(self, images: jax.Array, tokens: jax.Array, image_type: int = IMAGE_TYPE) -> jax.Array:
    """(B, W) pooled states of the image-text pairs."""
    text, _ = self.encoder(images, tokens, None, image_type)
    return jnp.tanh(self.pooler(text[:, 0]))


def cross_entropy(
  logits: jax.Array, labels: jax.Array, smoothing: float, prefix: str
) -> tuple[jax.Array, Metrics]:
  """Mean cross-entropy against (smoothed) one-hot labels, and the accuracy."""
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy}


# ---------------------------------------------------------------- pretrained parameters


def fit_params(template: Params, source: Any, where: str) -> Params:
  """`source` arranged as `template` (same keys and shapes, template's dtypes); a
  ConfigError lists what is missing or mis-shaped."""
  if not isinstance(source, dict):
    raise ConfigError(f"config.finetune.pretrained: the run has no {where!r} parameters")
  want = traverse_util.flatten_dict(template, sep="/")
  have = traverse_util.flatten_dict(source, sep="/")
  problems = [f"{where}/{k} missing" for k in want if k not in have]
  problems += [
    f"{where}/{k} is {tuple(np.shape(have[k]))} there, {tuple(v.shape)} here"
    for k, v in want.items()
    if k in have and tuple(np.shape(have[k])) != tuple(v.shape)
  ]
  if problems:
    raise ConfigError(
      f"config.finetune.pretrained: the run's parameters do not fit this model ("
      f"{'; '.join(problems[:8])}{'; ...' if len(problems) > 8 else ''}): give the "
      "pretraining run's config.model and tokenizer (config.data.tokenizer / vocab_file)"
    )
  filled = {k: np.asarray(have[k], dtype=np.asarray(v).dtype) for k, v in want.items()}
  return traverse_util.unflatten_dict(filled, sep="/")


def _top_key(path: tuple) -> str:
  return str(getattr(path[0], "key", "")) if path else ""


def scale_top_level(factors: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates under each top-level key of `factors` by its factor (the
  new heads' lr multiplier; 0 freezes a part, weight decay included)."""

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
      lambda path, u: u * factors.get(_top_key(path), 1.0), updates
    )
    return scaled, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# ---------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class VlcFinetune(Method):
  """What every VLC fine-tuning task does alike; a task implements `batch_spec`,
  `task_loss` and `predict_fns` and overrides what else differs."""

  model: FinetuneModel
  context_length: int
  optim_config: ml_collections.ConfigDict = dataclasses.field(compare=False)
  lr_decay: float = 0.5
  head_lr_multiplier: float = 1.0
  pretrained: str = ""  # A VLC run's workdir.
  train_spec: str = ""  # config.finetune.train.
  builtin: BuiltinSets | None = None
  seed: int = 0
  num_workers: int = 0
  read_threads: int = 4
  crop_scale: tuple[float, float] | None = None
  flip: bool = False
  max_skipped_fraction: float = 0.01  # config.data's: unreadable training images allowed.
  report_name: str = "vlp_jax-VLC"

  task: ClassVar[str] = ""  # config.method is "vlc_<task>".
  new_heads: ClassVar[tuple[str, ...]] = ()  # Top-level parameters head_lr_multiplier scales.
  frozen: ClassVar[tuple[str, ...]] = ()  # Top-level parameters kept as pretrained.

  @property
  def image_size(self) -> int:
    return self.model.encoder.image_size

  @property
  def depth(self) -> int:
    return self.model.encoder.size.depth

  def image_spec(self, batch_size: int) -> jax.ShapeDtypeStruct:
    size = self.image_size
    return jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8)

  def tokens_spec(self, batch_size: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch_size, self.context_length), jnp.int32)

  def apply_fn(self) -> Callable[..., jax.Array]:
    """(params, *inputs) -> the model's outputs for prediction (no dropout), in float32."""
    model = self.model

    def apply(params: Params, *inputs: jax.Array) -> jax.Array:
      return model.apply({"params": params}, *inputs).astype(jnp.float32)

    return apply

  # ------------------------------------------------------------ jitted

  def init(self, rng: jax.Array) -> tuple[Params, Extra]:
    return self.model.init_params(rng, self.context_length), {}

  def loss(
    self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, tuple[Metrics, Extra]]:
    del step
    # No gradient for the frozen parts.
    params = {**params, **{k: jax.lax.stop_gradient(params[k]) for k in self.frozen}}
    loss, metrics = self.task_loss({"params": params}, batch, rng)
    metrics["loss"] = loss
    return loss, (metrics, extra)

  @abc.abstractmethod
  def task_loss(self, variables: dict, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    """The task's scalar loss and metrics over a batch (`rng`: dropout and draws)."""

  # ------------------------------------------------------------ optimizer

  def param_labels(self) -> Callable[[Params], Any] | None:
    # One group, so global-norm clipping sees every gradient. (A frozen part is scaled
    # to 0 inside it, not labelled "freeze": the layer-wise transform cannot skip optax's
    # masked leaves.)
    return lambda params: jax.tree.map(lambda _: vlc.LAYERWISE, params)

  def optimizer_groups(self, schedule: optax.Schedule) -> dict[str, optax.GradientTransformation]:
    groups = vlc.layerwise_lr_decay_transforms(
      self.optim_config, schedule, self.depth, self.lr_decay
    )
    factors = dict.fromkeys(self.new_heads, self.head_lr_multiplier)
    factors.update(dict.fromkeys(self.frozen, 0.0))
    groups[vlc.LAYERWISE] = optax.chain(groups[vlc.LAYERWISE], scale_top_level(factors))
    return groups

  # ------------------------------------------------------------ host

  def data_options(self, ctx: DataContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the dataset arguments every task's training data takes, drop_unreadable's
    screening arguments)."""
    common = dict(
      image_size=self.image_size,
      batch_size=ctx.local_batch_size,
      seed=self.seed,
      num_workers=self.num_workers,
      read_threads=self.read_threads,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      crop_scale=self.crop_scale,
    )
    # Every unreadable image is listed there (process 0's), found before training or later.
    skip_list = os.path.join(ctx.workdir, image_files.SKIP_LIST_FILE)
    skip_list = skip_list if jax.process_index() == 0 else ""
    screen = dict(
      source=TRAIN_KEY,
      max_skipped_fraction=self.max_skipped_fraction,
      skip_list=skip_list,
      read_threads=self.read_threads,
    )
    return common, screen

  def transfer_pretrained(self, params: Params, source: Params) -> Params:
    """The fine-tuning parameters `params` (host arrays) with the encoder (and pooler) of
    a VLC run's `source` parameters; the new heads keep their initialisation."""
    out = dict(params)
    out["encoder"] = fit_params(params["encoder"], source.get("encoder"), "encoder")
    if "pooler" in params:
      out["pooler"] = fit_params(params["pooler"], source.get("pooler"), "pooler")
    return out

  def pretrained_params(self, gather: Callable[[], Params]) -> Params | None:
    if self.pretrained == NO_PRETRAINED:
      logging.warning(
        "Fine-tuning %s from random initialisation (config.finetune.pretrained=%s)",
        self.task,
        NO_PRETRAINED,
      )
      return None
    if not self.pretrained:
      raise ConfigError(
        "config.finetune.pretrained is empty: give the VLC pretraining run (its workdir) "
        f"to fine-tune, or {NO_PRETRAINED!r} to fine-tune from random initialisation on "
        "purpose (e.g. --config=configs/demo_vqa.py:pretrained=none)"
      )
    from vlp_jax.weights import convert

    try:
      source, info = convert.read_params(self.pretrained)
    except (ValueError, OSError) as e:
      raise ConfigError(f"config.finetune.pretrained: {e}") from e
    method = info.get("config", {}).get("method", "")
    if method and not method.startswith("vlc"):
      raise ConfigError(
        f"config.finetune.pretrained: {self.pretrained} is a {method!r} run, not a VLC one"
      )
    logging.info("Fine-tuning %s from the VLC run %s", self.task, self.pretrained)
    return self.transfer_pretrained(gather(), source)

  def outputs_summary(self) -> str:
    """The head's outputs for the summary line ("" where they say nothing)."""
    return ""

  def summary(self, params: Params) -> str:
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    heads = {k: count(v) for k, v in params.items() if k not in ("encoder", "pooler")}
    return (
      f"VLC {self.task}: {count(params) / 1e6:.2f}M parameters (encoder "
      f"{count(params['encoder']) / 1e6:.2f}M; heads {heads}); {self.outputs_summary()} "
      f"layer-wise lr decay {self.lr_decay} over {self.depth} blocks"
    )

  @property
  def model_name(self) -> str:
    return self.report_name


# ---------------------------------------------------------------- building


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for part in key.split("."):
    node = node[part]
  return node


def prepare(
  ctx: MethodContext, task: str, reads_train: bool = True
) -> tuple[SingleStreamEncoder, dict[str, Any]]:
  """The encoder and VlcFinetune's fields from config.model / config.finetune, after
  the checks every task shares (ValueError naming a bad key); `reads_train`: the task
  reads config.finetune.train."""
  config, tune = ctx.config, ctx.config.finetune
  for key in ("model.init", "model.image.init", "model.text.init"):
    if _get(config, key):
      raise ValueError(
        f"config.{key}: fine-tuning starts from a VLC run (config.finetune.pretrained)"
      )
  pretrained = tune.pretrained if tune.pretrained != NO_PRETRAINED else ""
  if pretrained and config.init_from:
    raise ValueError(
      "config.init_from and config.finetune.pretrained are both set: init_from restores a "
      "run of this same fine-tuning model, finetune.pretrained a VLC pretraining run"
    )
  if pretrained and not os.path.isdir(pretrained):
    raise ValueError(f"config.finetune.pretrained: {tune.pretrained!r} is not a directory")
  tokenizer = ctx.tokenizer
  encoder = vlc.create_model(
    config, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.context_length, ctx.platform
  ).encoder
  if reads_train and not tune.train:
    raise ValueError(
      f"{TRAIN_KEY} is empty: give the {task} training data (configs/common.py lists the "
      "formats), or builtin for vqa / nlvr2"
    )
  image = config.model.image
  fields = dict(
    context_length=tokenizer.context_length,
    optim_config=config.optim,
    lr_decay=tune.lr_decay,
    head_lr_multiplier=tune.head_lr_multiplier,
    pretrained=tune.pretrained,
    train_spec=tune.train,
    builtin=BuiltinSets.from_config(config),
    seed=config.seed,
    num_workers=config.data.num_workers,
    read_threads=config.data.read_threads,
    crop_scale=tuple(tune.crop_scale) if tune.crop_scale is not None else None,
    flip=tune.flip,
    max_skipped_fraction=config.data.max_skipped_fraction,
    report_name=f"vlp_jax-VLC-{task}-ViT-{image.variant}-{image.image_size}px",
  )
  return encoder, fields
