"""Fine-tuning a VLC run on NLVR2 (config.method "vlc_nlvr2"; vlc_finetune.py).

Two encoder passes with the same text, the left image with token type 1 and the right
one with type 2 (type 2 starts as a copy of type 1, as VLC and ViLT do); the two pooled
states concatenated -> Dense(2W) -> LayerNorm -> GELU -> Dense(2) (ViLT's
nlvr2_classifier); cross-entropy.

Prediction: "nlvr2_logits" (params, left, right, tokens) -> (B, 2), which evaluation's
NLVR2 task reads.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.input_pipeline import finetune_data, nlvr2_data, task_data
from vlp_jax.methods import vlc_finetune
from vlp_jax.methods.base import (
  Batch,
  DataContext,
  MethodContext,
  Metrics,
  Params,
  PredictFn,
  dropout_rngs,
)
from vlp_jax.methods.vlc_finetune import ClassifierMlp, PooledModel, VlcFinetune
from vlp_jax.models.single_stream import IMAGE_TYPE, SECOND_IMAGE_TYPE


class Nlvr2Model(PooledModel):
  """The encoder, its pooler and the NLVR2 head over both images' pooled states."""

  def setup(self) -> None:
    super().setup()
    self.nlvr2_head = ClassifierMlp(2 * self.encoder.size.width, 2, self.encoder.dtype)

  def __call__(self, images: jax.Array, tokens: jax.Array, images2: jax.Array) -> jax.Array:
    pair = [
      self.pooled(images, tokens, IMAGE_TYPE),
      self.pooled(images2, tokens, SECOND_IMAGE_TYPE),
    ]
    return self.nlvr2_head(jnp.concatenate(pair, axis=-1))

  def every_head(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    return self(images, tokens, images)


@dataclasses.dataclass(frozen=True)
class VlcNlvr2(VlcFinetune):
  name = "vlc_nlvr2"
  task = "nlvr2"
  new_heads = ("nlvr2_head",)

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    image = self.image_spec(batch_size)
    label = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return {"image": image, "image2": image, "tokens": self.tokens_spec(batch_size), "label": label}

  def task_loss(self, variables: dict, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    logits = self.model.apply(
      variables, batch["image"], batch["tokens"], batch["image2"], rngs=dropout_rngs(rng)
    )
    return vlc_finetune.cross_entropy(logits, batch["label"], 0.0, "nlvr2")

  def predict_fns(self) -> dict[str, PredictFn]:
    apply = self.apply_fn()

    def nlvr2_logits(params: Params, left: jax.Array, right: jax.Array, tokens: jax.Array):
      return apply(params, left, tokens, right)

    return {"nlvr2_logits": nlvr2_logits}

  def train_data(self, ctx: DataContext) -> grain.IterDataset:
    common, screen = self.data_options(ctx)
    _, examples = finetune_data.read_nlvr2_spec(
      self.train_spec, True, self.builtin, vlc_finetune.TRAIN_KEY
    )
    examples = task_data.drop_unreadable(examples, **screen)
    return nlvr2_data.create_nlvr2_dataset(
      examples, ctx.tokenizer, train=True, skip_list=screen["skip_list"], **common
    )

  def transfer_pretrained(self, params: Params, source: Params) -> Params:
    """As VlcFinetune's; the second image's token type starts as the first image's
    (unless the run fine-tuned it already)."""
    out = super().transfer_pretrained(params, source)
    if "nlvr2_head" not in source:
      types = np.array(out["encoder"]["token_type_embedding"])
      types[SECOND_IMAGE_TYPE] = types[IMAGE_TYPE]
      out["encoder"] = {**out["encoder"], "token_type_embedding": types}
    return out


def create(ctx: MethodContext) -> VlcNlvr2:
  """NLVR2 fine-tuning from config.model / config.finetune (its training files are read
  now, so that a bad one fails before compute)."""
  encoder, fields = vlc_finetune.prepare(ctx, VlcNlvr2.task)
  finetune_data.read_nlvr2_spec(
    ctx.config.finetune.train, True, fields["builtin"], vlc_finetune.TRAIN_KEY
  )
  return VlcNlvr2(model=Nlvr2Model(encoder), **fields)
