"""Fine-tuning a VLC run for image-text retrieval (config.method "vlc_retrieval";
vlc_finetune.py), as VLC's irtr.

A rank head Dense(1) initialised from the ITM head's "matched" row; each image is scored
against its caption and `num_negatives` captions of other rows of the batch,
cross-entropy towards its own (VLC's irtr, whose negatives are drawn from the dataset);
the ITM head stays frozen. `itm_weight` > 0 adds that x the ITM loss (random-image
negatives): VLC's config lists 0.5, but its set_task drops every loss weighted under 1,
so the reference trains the rank loss alone (itm_weight 0). Training data: the image-text
shards of config.data.train.

Prediction: "match_image" / "match_score" (the rank head), which evaluation's
itm_retrieval task (evaluation/rerank.py) reads.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlp_jax import losses
from vlp_jax.methods import vlc, vlc_finetune
from vlp_jax.methods.base import Batch, MethodContext, Metrics, Params, PredictFn, dropout_rngs
from vlp_jax.methods.vlc_finetune import INIT, PooledModel, VlcFinetune, fit_params
from vlp_jax.models.heads import ItmHead


class RetrievalModel(PooledModel):
  """The encoder, its pooler, the rank head and the (frozen) ITM head."""

  def setup(self) -> None:
    super().setup()
    self.rank_head = nn.Dense(1, dtype=self.encoder.dtype, kernel_init=INIT)
    self.itm_head = ItmHead(self.encoder.dtype)

  def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """(B,) rank scores of the image-text pairs."""
    return self.rank_head(self.pooled(images, tokens))[:, 0]

  def itm_logits(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """The ITM head's logits (B, 2)."""
    return self.itm_head(self.pooled(images, tokens))

  def every_head(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self(images, tokens), self.itm_logits(images, tokens)


def negative_captions(rng: jax.Array, batch: int, num_negatives: int) -> jax.Array:
  """(B, 1 + num_negatives) caption rows per image: its own first, then the captions of
  `num_negatives` distinct other rows (the same random offsets for every row, so each
  row's negatives are distinct and never its own)."""
  offsets = jax.random.choice(rng, batch - 1, (num_negatives,), replace=False) + 1
  offsets = jnp.concatenate([jnp.zeros((1,), offsets.dtype), offsets])
  return (jnp.arange(batch)[:, None] + offsets[None]) % batch


@dataclasses.dataclass(frozen=True)
class VlcRetrieval(VlcFinetune):
  num_negatives: int = 15
  itm_weight: float = 0.0

  name = "vlc_retrieval"
  task = "retrieval"
  frozen = ("itm_head",)  # VLC keeps the pretrained ITM head.

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"image": self.image_spec(batch_size), "tokens": self.tokens_spec(batch_size)}

  def task_loss(self, variables: dict, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    images, tokens = batch["image"], batch["tokens"]
    rows, choices = images.shape[0], self.num_negatives + 1
    rank_rng, pair_rng = jax.random.split(rng)
    # Every image against its caption (column 0) and num_negatives other rows' captions.
    captions = tokens[negative_captions(rank_rng, rows, self.num_negatives)]
    scores = self.model.apply(
      variables,
      jnp.repeat(images, choices, axis=0),
      captions.reshape(rows * choices, -1),
      rngs=dropout_rngs(rng, 0),
    )
    scores = scores.reshape(rows, choices).astype(jnp.float32)
    rank = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(scores, jnp.zeros(rows, int)))
    metrics = {
      "irtr_loss": rank,
      "irtr_accuracy": jnp.mean((jnp.argmax(scores, axis=-1) == 0).astype(jnp.float32)),
    }
    loss = rank
    if self.itm_weight > 0:
      itm_images, labels = vlc.itm_pairs(pair_rng, images)
      logits = self.model.apply(
        variables, itm_images, tokens, method=RetrievalModel.itm_logits, rngs=dropout_rngs(rng, 1)
      )
      itm, itm_metrics = losses.itm_loss(logits, labels)
      metrics.update(itm_loss=itm, **itm_metrics)
      loss = loss + self.itm_weight * itm
    return loss, metrics

  def predict_fns(self) -> dict[str, PredictFn]:
    def match_image(params: Params, images: jax.Array) -> jax.Array:
      del params  # A single-stream model sees image and text together: keep the pixels.
      return images

    return {"match_image": match_image, "match_score": self.apply_fn()}

  def transfer_pretrained(self, params: Params, source: Params) -> Params:
    """As VlcFinetune's; the ITM head comes along and the rank head starts as its
    "matched" row (unless the run has a rank head)."""
    out = super().transfer_pretrained(params, source)
    out["itm_head"] = fit_params(params["itm_head"], source.get("itm_head"), "itm_head")
    if "rank_head" in source:
      out["rank_head"] = fit_params(params["rank_head"], source["rank_head"], "rank_head")
    else:
      itm = out["itm_head"]["itm_head"]
      out["rank_head"] = {"kernel": itm["kernel"][:, 1:].copy(), "bias": itm["bias"][1:].copy()}
    return out


def create(ctx: MethodContext) -> VlcRetrieval:
  """Retrieval fine-tuning from config.model / config.finetune (ValueError naming a bad
  key); it trains on config.data.train."""
  config, tune = ctx.config, ctx.config.finetune
  encoder, fields = vlc_finetune.prepare(ctx, VlcRetrieval.task, reads_train=False)
  if tune.num_negatives >= config.batch_size:
    raise ValueError(
      f"config.finetune.num_negatives={tune.num_negatives}: needs that many other rows, "
      f"config.batch_size={config.batch_size} has {config.batch_size - 1}"
    )
  if config.batch_size < 2:
    raise ValueError(f"config.batch_size={config.batch_size}: ITM needs two rows to swap images")
  return VlcRetrieval(
    model=RetrievalModel(encoder),
    num_negatives=tune.num_negatives,
    itm_weight=tune.itm_weight,
    **fields,
  )
