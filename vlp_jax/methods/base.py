"""What every training method provides the trainer, evaluation and input pipeline.

A method owns its model, objective and extra state; the trainer owns the loop, the
optimizer step, checkpoints and evaluation calls, and names no method. See
docs/DESIGN.md ("Methods": how to add one).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from vlp_jax import peft
from vlp_jax.input_pipeline import records
from vlp_jax.input_pipeline.pipeline import RowExtension
from vlp_jax.input_pipeline.tokenizers import Tokenizer

Params = Any
Extra = Any  # Non-parameter state (EMA copies, queues, baselines): a pytree of arrays.
Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]
# (params, inputs) -> predictions, jitted by evaluation, e.g. "embed_image": uint8 images
# (B, S, S, 3) -> (B, D) unit embeddings; "embed_text": int32 tokens (B, T) -> (B, D).
PredictFn = Callable[[Params, jax.Array], jax.Array]
LossAndGrads = tuple[tuple[jax.Array, tuple[Metrics, Extra]], Params]

# Folded into the step rng for dropout keys, so a method's other draws from that rng
# (negatives, masks) stay what they were without dropout.
_DROPOUT_STREAM = 0x64726F70  # "drop"


def dropout_rngs(rng: jax.Array, call: int = 0) -> dict[str, jax.Array]:
  """`apply(..., rngs=)` for a training forward pass: a "dropout" key from the step's
  `rng`, another for each `call` number. Prediction and evaluation pass none, which
  makes every dropout layer the identity (models.layers.apply_dropout)."""
  return {"dropout": jax.random.fold_in(jax.random.fold_in(rng, _DROPOUT_STREAM), call)}


@dataclasses.dataclass(frozen=True)
class MethodContext:
  """What a method is built from (validated config, mesh, tokenizer, run length)."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  tokenizer: Tokenizer  # Or anything with vocab_size, pad_id and context_length.
  total_steps: int
  train_sets: tuple[records.ShardSet, ...] = ()  # Empty where no data is read (benchmarks).

  @property
  def platform(self) -> str:
    """The mesh's platform ("cpu", "gpu", "tpu"), which picks config.model.dtype "auto":
    the target's, not the host's (a TPU topology's mesh compiled from a CPU host)."""
    return self.mesh.devices.flat[0].platform


@dataclasses.dataclass(frozen=True)
class DataContext:
  """What `Method.pipeline_extension` may use: the starting parameters (a fresh run's
  initial or pretrained ones, a resumed run's restored ones are not loaded yet), the
  evaluation embedder built from the method's predict functions, the training shards."""

  workdir: str
  params: Params
  embed_images: Callable[[Any, int], np.ndarray]  # (image sources, count) -> (count, D).
  train_sets: Sequence[records.ShardSet]
  tokenizer: Tokenizer | None = None
  local_batch_size: int = 0  # This process's rows of every global batch.


class Method(abc.ABC):
  """Base class with the defaults; a method implements the three abstract methods and
  overrides what else differs.

  Inside jit: `loss`, `loss_and_grads`, the predict functions. On the host, once:
  everything else.
  """

  name = "method"

  @abc.abstractmethod
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Name -> shape and dtype of every field the step reads from a global batch."""

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> tuple[Params, Extra]:
    """Initial parameters and extra state (jitted into their shardings)."""

  @abc.abstractmethod
  def loss(
    self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, tuple[Metrics, Extra]]:
    """Scalar loss, its metrics (on device) and the next extra state."""

  def loss_and_grads(
    self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
  ) -> LossAndGrads:
    """((loss, (metrics, new_extra)), grads w.r.t. params); override for e.g. GradCache."""
    return jax.value_and_grad(self.loss, has_aux=True)(params, extra, batch, rng, step)

  def param_labels(self) -> Callable[[Params], Any] | None:
    """params -> tree of optimizer-group labels ("train", "freeze", or a label of
    `optimizer_groups`); None: everything is "train"."""
    return None

  def optimizer_groups(self, schedule: optax.Schedule) -> dict[str, optax.GradientTransformation]:
    """Labels beyond "train" (the configured AdamW) and "freeze" with their transforms."""
    del schedule
    return {}

  def predict_fns(self) -> dict[str, PredictFn]:
    """Prediction functions by name; an evaluation task runs where the method offers the
    ones its TaskDef needs (vlp_jax/evaluation/tasks)."""
    return {}

  def pipeline_extension(self, ctx: DataContext) -> RowExtension | None:
    """Fields added to every training row; called once before data starts, so it may
    prepare them (NegCLIP mines its hard images here)."""
    del ctx
    return None

  def train_data(self, ctx: DataContext) -> grain.IterDataset | None:
    """This process's training batches when the method reads data of its own (a
    fine-tuning task's questions and answers), or None: the image-text shards of
    config.data.train with `pipeline_extension`'s fields. Must be a grain dataset, so
    the checkpoint records its position."""
    del ctx
    return None

  def pretrained_params(self, gather: Callable[[], Params]) -> Params | None:
    """A fresh run's starting parameters from configured checkpoints, or None.
    `gather()` returns the initial parameters as host arrays (costly: call it only when
    there is something to load)."""
    del gather
    return None

  def summary(self, params: Params) -> str:
    """One log line describing the model, at the start of training."""
    trainable, total = peft.count(params, self.param_labels())
    return f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable"

  def images_to_log(self, host_batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """TensorBoard pictures for this step, e.g. masks ({} most steps)."""
    del host_batch, step
    return {}

  @property
  def model_name(self) -> str:
    """The name evaluation reports carry."""
    return f"vlp_jax-{self.name}"


def trainable(params: Params, labels: Callable[[Params], Any] | None) -> Params:
  """`params` with frozen leaves behind stop_gradient (no gradient computed for them)."""
  return params if labels is None else peft.freeze_gradients(params, labels(params))
