"""Fine-tuning a VLC run's image encoder on image classification (config.method
"vlc_classify"; vlc_finetune.py).

The image alone (no text tokens); the mean of the patch states -> LayerNorm ->
Dense(classes) (MAE's fine-tuning head with global pooling, which VLC's ImageNet
fine-tune uses); cross-entropy with label smoothing. Training data: the classification
set of config.finetune.train (input_pipeline/classify_data.py), with random-resized
crops and flips when configured.

Prediction: "class_logits" (params, images) -> (B, classes), which evaluation's
classify_finetuned task reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.input_pipeline import classify_data, finetune_data, image_files, task_data
from vlp_jax.input_pipeline.image_sources import ImageRef
from vlp_jax.methods import vlc_finetune
from vlp_jax.methods.base import Batch, DataContext, MethodContext, Metrics, PredictFn, dropout_rngs
from vlp_jax.methods.vlc_finetune import FinetuneModel, VlcFinetune

_CLASS_HEAD_INIT = nn.initializers.normal(2e-5)  # MAE's fine-tuning head.


class ClassifyModel(FinetuneModel):
  """The encoder over the image alone and MAE's global-pool head: (B, classes) logits."""

  def setup(self) -> None:
    dtype = self.encoder.dtype
    self.fc_norm = nn.LayerNorm(epsilon=1e-6, dtype=dtype)
    self.class_head = nn.Dense(self.num_outputs, dtype=dtype, kernel_init=_CLASS_HEAD_INIT)

  def __call__(self, images: jax.Array) -> jax.Array:
    no_text = jnp.zeros((images.shape[0], 0), jnp.int32)
    _, image = self.encoder(images, no_text)
    return self.class_head(self.fc_norm(jnp.mean(image[:, 1:], axis=1)))

  def every_head(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    del tokens
    return self(images)


@dataclasses.dataclass(frozen=True)
class VlcClassify(VlcFinetune):
  label_smoothing: float = 0.1

  name = "vlc_classify"
  task = "classify"
  new_heads = ("fc_norm", "class_head")

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    label = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return {"image": self.image_spec(batch_size), "label": label}

  def task_loss(self, variables: dict, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    logits = self.model.apply(variables, batch["image"], rngs=dropout_rngs(rng))
    return vlc_finetune.cross_entropy(logits, batch["label"], self.label_smoothing, "class")

  def predict_fns(self) -> dict[str, PredictFn]:
    return {"class_logits": self.apply_fn()}

  def train_data(self, ctx: DataContext) -> grain.IterDataset:
    common, screen = self.data_options(ctx)
    data = finetune_data.read_classification_spec(self.train_spec, True, vlc_finetune.TRAIN_KEY)
    if isinstance(data.images, Sequence):
      # Image files are only stat-ed here (a class-folder set may hold millions).
      kept = task_data.drop_unreadable(
        list(zip(data.images, data.labels)),
        images_of=lambda e: (e[0].path,) if isinstance(e[0], ImageRef) and e[0].path else (),
        check=image_files.check_image_file,
        **screen,
      )
      labels = np.asarray([label for _, label in kept], data.labels.dtype)
      data = dataclasses.replace(data, images=[image for image, _ in kept], labels=labels)
    return classify_data.create_classification_dataset(
      data, flip=self.flip, skip_list=screen["skip_list"], **common
    )

  def outputs_summary(self) -> str:
    return f"{self.model.num_outputs} classes"


def create(ctx: MethodContext) -> VlcClassify:
  """Classification fine-tuning from config.model / config.finetune (the training set is
  read now: the head's size needs its classes)."""
  encoder, fields = vlc_finetune.prepare(ctx, VlcClassify.task)
  data = finetune_data.read_classification_spec(
    ctx.config.finetune.train, True, vlc_finetune.TRAIN_KEY
  )
  return VlcClassify(
    model=ClassifyModel(encoder, len(data.classnames)),
    label_smoothing=ctx.config.finetune.label_smoothing,
    **fields,
  )
