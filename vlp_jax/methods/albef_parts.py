"""The pieces of ALBEF's step below the method (methods/albef.py wires them; CMask reuses
them): ITA with momentum distillation over batch and queue, hard-negative draws for ITM,
the gather / scatter of MLM positions, the distillation ramp, the fused pass of the ITM
and MLM rows, the MLM head pass, the prediction functions, and the records the MLM hooks
pass (`MlmChoice`, `MlmPass`). `apply(params, *args, method=, rngs=)` is the method's
model apply (`Albef._apply`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vlp_jax import losses
from vlp_jax.methods import buffers
from vlp_jax.methods.base import Metrics, Params, PredictFn, dropout_rngs
from vlp_jax.models.albef import AlbefModel

Apply = Callable[..., Any]  # Albef._apply: (params, *args, method=, rngs=None) -> outputs.

# A logit no softmax weight survives (finite, so 0 * it stays 0 in the soft targets).
_EXCLUDED = -1e9


@dataclasses.dataclass(frozen=True)
class MlmChoice:
  """What `select_mlm` decided: the encoder's input ids, the positions predicted, and
  anything `mlm_feedback` needs later (e.g. an agent's log-probability)."""

  inputs: jax.Array  # (B, T) int32: the caption with the chosen tokens replaced.
  selected: jax.Array  # (B, T) bool: the positions the MLM loss is taken over.
  aux: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MlmPass:
  """The MLM forward pass, for `mlm_feedback`: the fusion layers' information flow into
  every token (L, B, T) (models.fusion.information_flow), the positions the head
  predicted (B, T) (the selected ones up to `Albef.mlm_capacity`), the per-token
  cross-entropy (B, T) against the original ids there (0 elsewhere), the loss and the
  accuracy over the predicted positions."""

  flows: jax.Array
  predicted: jax.Array
  token_loss: jax.Array
  loss: jax.Array
  accuracy: jax.Array


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One step's unimodal passes (`Albef._encode`); the *_m fields are the momentum
  model's, behind stop_gradient."""

  image_tokens: jax.Array  # (B, N, Wi)
  image_feat: jax.Array  # (B, E), unit
  text_states: jax.Array  # (B, T, W): the caption's text-only states.
  text_feat: jax.Array  # (B, E), unit
  choice: MlmChoice
  image_tokens_m: jax.Array
  image_feat_m: jax.Array
  text_feat_m: jax.Array
  masked_states_m: jax.Array  # The masked caption's text-only states.


def ita_loss(
  image_feat: jax.Array,
  text_feat: jax.Array,
  image_feat_m: jax.Array,
  text_feat_m: jax.Array,
  image_queue: buffers.FeatureQueue,
  text_queue: buffers.FeatureQueue,
  temperature: jax.Array,
  alpha: jax.Array,
  use_queue: jax.Array | bool = True,
) -> tuple[jax.Array, Metrics, jax.Array, jax.Array]:
  """ALBEF's contrastive loss with momentum distillation, on unit features (B, E).

  Each online image is scored against [momentum texts of the batch; text queue] (and
  each text against the images alike), divided by the temperature; its targets are
  alpha * softmax(the momentum image's scores) + (1 - alpha) * one-hot(own caption).
  `use_queue` false leaves the queue out (config.albef.queue_warmup_steps).
  Returns (loss, metrics, i2t logits (B, B + Q), t2i logits (B, B + Q)).
  """
  rows = image_feat.shape[0]
  allowed = jnp.concatenate([jnp.ones((rows,), bool), text_queue.valid() & use_queue])
  allowed_images = jnp.concatenate([jnp.ones((rows,), bool), image_queue.valid() & use_queue])
  text_all = jnp.concatenate([text_feat_m, text_queue.features.astype(text_feat_m.dtype)])
  image_all = jnp.concatenate([image_feat_m, image_queue.features.astype(image_feat_m.dtype)])

  def logits(queries: jax.Array, keys: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.where(valid[None], queries @ keys.T / temperature, _EXCLUDED)

  sim_i2t = logits(image_feat, text_all, allowed)
  sim_t2i = logits(text_feat, image_all, allowed_images)
  hard = jax.nn.one_hot(jnp.arange(rows), sim_i2t.shape[1], dtype=jnp.float32)
  # The momentum scores use the same (online) temperature, behind stop_gradient.
  soft_i2t = jax.nn.softmax(logits(image_feat_m, text_all, allowed), axis=-1)
  soft_t2i = jax.nn.softmax(logits(text_feat_m, image_all, allowed_images), axis=-1)
  targets_i2t, targets_t2i = jax.lax.stop_gradient(
    (alpha * soft_i2t + (1 - alpha) * hard, alpha * soft_t2i + (1 - alpha) * hard)
  )

  def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits, axis=-1) * targets, axis=-1))

  loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
  accuracy = jnp.mean((jnp.argmax(sim_i2t, axis=-1) == jnp.arange(rows)).astype(jnp.float32))
  return loss, {"ita_loss": loss, "ita_i2t_accuracy": accuracy}, sim_i2t, sim_t2i


def itm_negatives(
  rng: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array, exclude: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """(negative image per text (B,), negative text per image (B,)), each drawn from
  softmax(row of the batch logits) with the positive and `exclude` (B, B) left out, as
  ALBEF's models/model_pretrain.py (softmax(sim[:, :bs]), diagonal zeroed,
  torch.multinomial). Drawn from the logits (losses.sample_negatives), so no row's
  probabilities underflow to all zeros and nothing needs an epsilon: a row with nothing
  left to draw gets its own index."""
  rows = sim_i2t.shape[0]
  image_rng, text_rng = jax.random.split(rng)
  negative_images = losses.sample_negatives(image_rng, sim_t2i[:, :rows], exclude)
  negative_texts = losses.sample_negatives(text_rng, sim_i2t[:, :rows], exclude)
  return negative_images, negative_texts


def gather_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x (B, T, ...) at flat positions (K,) into B x T: (K, ...)."""
  return x.reshape(-1, *x.shape[2:])[positions]


def scatter_rows(
  values: jax.Array, positions: jax.Array, kept: jax.Array, shape: tuple[int, int]
) -> jax.Array:
  """`gather_rows`'s inverse for the kept entries: (B, T) zeros with values (K,) at their
  flat positions (padding entries are dropped, so they never overwrite a real one)."""
  flat = jnp.zeros((shape[0] * shape[1],), values.dtype)
  index = jnp.where(kept, positions, flat.shape[0])
  return flat.at[index].set(values, mode="drop").reshape(shape)


def alpha_at(step: jax.Array, alpha: float, ramp_steps: int) -> jax.Array:
  """The distillation weight at `step` (0-based): alpha * min(1, step / ramp_steps), as
  ALBEF's first epoch (iteration i of epoch 0: alpha * min(1, i / len(loader)))."""
  if ramp_steps <= 0:
    return jnp.asarray(alpha, jnp.float32)
  return alpha * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / ramp_steps)


def draw_negatives(
  rng: jax.Array, tokens: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(hard negative image per text, hard negative text per image), (B,) each, from the
  ITA logits of the global batch (online features against the batch's momentum
  features, as ALBEF)."""
  # A caption identical to the row's own would be a positive, not a negative.
  same_caption = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)
  return itm_negatives(rng, sim_i2t, sim_t2i, same_caption)


def fused_heads(
  apply: Apply,
  online: Params,
  text_states: jax.Array,
  masked_states: jax.Array,
  mask: jax.Array,
  image_tokens: jax.Array,
  negative_images: jax.Array,
  negative_texts: jax.Array,
  rngs: dict | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One pass of the fusion layers over [pairs; (text, its negative image); (negative
  text, image); (masked caption, image)]: (ITM logits (3B, 2), the masked captions'
  fused states (B, T, W), their information flows (L, B, T)). The B images' keys and
  values are computed once and indexed per row; `rngs`: dropout, each row its own."""
  rows = text_states.shape[0]
  states = jnp.concatenate([text_states, text_states, text_states[negative_texts], masked_states])
  masks = jnp.concatenate([mask, mask, mask[negative_texts], mask])
  own = jnp.arange(rows)
  image_index = jnp.concatenate([own, negative_images, own, own])
  fused, flows = apply(
    online, states, masks, image_tokens, image_index, method=AlbefModel.fuse, rngs=rngs
  )
  itm_logits = apply(online, fused[: 3 * rows], method=AlbefModel.itm_logits)
  return itm_logits, fused[3 * rows :], flows[:, 3 * rows :]


def mlm_pass(
  apply: Apply,
  online: Params,
  momentum: Params,
  fused: jax.Array,
  fused_m: jax.Array,
  flows: jax.Array,
  tokens: jax.Array,
  positions: jax.Array,
  kept: jax.Array,
  alpha: jax.Array,
) -> MlmPass:
  """Hard targets mixed with the momentum model's probabilities (ALBEF's soft labels),
  the vocabulary head of both models computed only at `positions` (Albef.mlm_positions)."""
  logits = apply(online, gather_rows(fused, positions), method=AlbefModel.mlm_logits)
  logits_m = apply(momentum, gather_rows(fused_m, positions), method=AlbefModel.mlm_logits)
  targets = gather_rows(tokens, positions)
  soft = jax.nn.softmax(jax.lax.stop_gradient(logits_m).astype(jnp.float32), axis=-1)
  loss, metrics = losses.mlm_loss(logits, targets, kept, soft, alpha)
  token_loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  predicted = scatter_rows(kept, positions, kept, tokens.shape)
  token_loss = scatter_rows(token_loss, positions, kept, tokens.shape)
  return MlmPass(flows, predicted, token_loss, loss, metrics["mlm_accuracy"])


def itm_and_mlm(
  apply: Apply,
  mlm_positions: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
  negatives: Callable[..., tuple[jax.Array, jax.Array]],
  online: Params,
  momentum: Params,
  enc: Encoded,
  tokens: jax.Array,
  mask: jax.Array,
  itm_rng: jax.Array,
  sims: tuple[jax.Array, jax.Array],
  rng: jax.Array,
  alpha: jax.Array,
) -> tuple[jax.Array, Metrics, MlmPass]:
  """ITM on hard negatives and momentum-distilled MLM, through one fusion pass; `sims`:
  ita_loss's (i2t, t2i) logits; `mlm_positions` and `negatives` (rng, tokens, *sims):
  the method's hooks (Albef.mlm_positions, Albef.draw_negatives)."""
  negative_images, negative_texts = negatives(itm_rng, tokens, *sims)
  masked_states, _ = apply(
    online, enc.choice.inputs, mask, method=AlbefModel.encode_text, rngs=dropout_rngs(rng, 4)
  )
  itm_logits, mlm_fused, flows = fused_heads(
    apply,
    online,
    enc.text_states,
    masked_states,
    mask,
    enc.image_tokens,
    negative_images,
    negative_texts,
    rngs=dropout_rngs(rng, 5),
  )
  rows = tokens.shape[0]
  labels = jnp.concatenate([jnp.ones((rows,), jnp.int32), jnp.zeros((2 * rows,), jnp.int32)])
  itm, itm_metrics = losses.itm_loss(itm_logits, labels)
  fused_m, _ = apply(
    momentum,
    enc.masked_states_m,
    mask,
    enc.image_tokens_m,
    method=AlbefModel.fuse,
    rngs=dropout_rngs(rng, 6),
  )
  positions, kept = mlm_positions(enc.choice.selected)
  mlm = mlm_pass(apply, online, momentum, mlm_fused, fused_m, flows, tokens, positions, kept, alpha)
  return itm, itm_metrics, mlm


def predict_fns(model: AlbefModel) -> dict[str, PredictFn]:
  """ITA embeddings for every retrieval / compositional task, and the ITM pair score
  for ALBEF's re-ranked retrieval (evaluation.rerank)."""

  def apply(params: Params, *args: Any, method: Callable) -> Any:
    return model.apply({"params": params["model"]}, *args, method=method)

  def embed_image(params: Params, images: jax.Array) -> jax.Array:
    return apply(params, images, method=AlbefModel.encode_image)[1]

  def embed_text(params: Params, tokens: jax.Array) -> jax.Array:
    return apply(params, tokens, method=AlbefModel.encode_text)[1]

  def match_image(params: Params, images: jax.Array) -> jax.Array:
    return apply(params, images, method=AlbefModel.encode_image)[0]

  def match_score(params: Params, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
    states, _ = apply(params, tokens, method=AlbefModel.encode_text)
    fused, _ = apply(
      params, states, tokens != model.text.pad_id, image_tokens, method=AlbefModel.fuse
    )
    # The "matched" logit, as ALBEF's retrieval ranks by itm_head(...)[:, 1].
    return apply(params, fused, method=AlbefModel.itm_logits)[:, 1].astype(jnp.float32)

  return {
    "embed_image": embed_image,
    "embed_text": embed_text,
    "match_image": match_image,
    "match_score": match_score,
  }
