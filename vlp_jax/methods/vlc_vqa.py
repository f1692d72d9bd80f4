"""Fine-tuning a VLC run on VQAv2 (config.method "vlc_vqa"; vlc_finetune.py).

The pooled state -> Dense(2W) -> LayerNorm -> GELU -> Dense(answers) (ViLT's
vqa_classifier); binary cross-entropy with the soft scores, averaged over rows and
answers and multiplied by the number of answers (ViLT / VLC, after ban-vqa). The answers
are config.finetune.answers or ViLT's vocabulary of the training annotations
(input_pipeline/finetune_data.py).

Prediction: "vqa_logits" (params, images, tokens) -> (B, answers), which evaluation's
VQA task reads.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import optax

from vlp_jax.input_pipeline import finetune_data, task_data, vqa_data
from vlp_jax.methods import vlc_finetune
from vlp_jax.methods.base import Batch, DataContext, MethodContext, Metrics, PredictFn, dropout_rngs
from vlp_jax.methods.vlc_finetune import ClassifierMlp, PooledModel, VlcFinetune


class VqaModel(PooledModel):
  """The encoder, its pooler and the VQA head: (B, answers) logits."""

  def setup(self) -> None:
    super().setup()
    self.vqa_head = ClassifierMlp(2 * self.encoder.size.width, self.num_outputs, self.encoder.dtype)

  def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    return self.vqa_head(self.pooled(images, tokens))


def vqa_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """ViLT / VLC's VQA loss: mean binary cross-entropy over rows x answers against the
  soft scores, times the number of answers (so it sums over answers, averages over rows)."""
  per_answer = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
  return jnp.mean(per_answer) * targets.shape[-1]


@dataclasses.dataclass(frozen=True)
class VlcVqa(VlcFinetune):
  answers: tuple[str, ...] = ()  # The head's outputs, in order.

  name = "vlc_vqa"
  task = "vqa"
  new_heads = ("vqa_head",)

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    targets = jax.ShapeDtypeStruct((batch_size, len(self.answers)), jnp.float32)
    image, tokens = self.image_spec(batch_size), self.tokens_spec(batch_size)
    return {"image": image, "tokens": tokens, "targets": targets}

  def task_loss(self, variables: dict, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    rngs = dropout_rngs(rng)  # Text-embedding dropout (VLC's drop_rate), and any other.
    logits = self.model.apply(variables, batch["image"], batch["tokens"], rngs=rngs)
    logits = logits.astype(jnp.float32)
    loss = vqa_loss(logits, batch["targets"])
    # ViLT's VQAScore: the soft score of the chosen answer.
    chosen = jnp.argmax(logits, axis=-1)[:, None]
    score = jnp.mean(jnp.take_along_axis(batch["targets"], chosen, axis=1))
    return loss, {"vqa_loss": loss, "vqa_score": score}

  def predict_fns(self) -> dict[str, PredictFn]:
    return {"vqa_logits": self.apply_fn()}

  def train_data(self, ctx: DataContext) -> grain.IterDataset:
    common, screen = self.data_options(ctx)
    _, examples = finetune_data.read_vqa_spec(
      self.train_spec, True, self.builtin, vlc_finetune.TRAIN_KEY
    )
    examples = task_data.drop_unreadable(examples, **screen)
    return vqa_data.create_vqa_dataset(
      examples, ctx.tokenizer, self.answers, train=True, skip_list=screen["skip_list"], **common
    )

  def outputs_summary(self) -> str:
    return f"{len(self.answers)} answers"


def create(ctx: MethodContext) -> VlcVqa:
  """VQA fine-tuning from config.model / config.finetune (the answer vocabulary is read
  now: the head's size needs it)."""
  encoder, fields = vlc_finetune.prepare(ctx, VlcVqa.task)
  answers = finetune_data.config_answer_vocab(ctx.config)
  return VlcVqa(model=VqaModel(encoder, len(answers)), answers=answers, **fields)
