"""Contrastive losses: InfoNCE (CLIP), sigmoid (SigLIP), NegCLIP's, and sharded forms.

All take L2-normalised (B, D) image and text embeddings of the global batch, row i of each
a positive pair, and return (loss, metrics). Sharded forms run under `shard_map` over the
mesh's batch axes, where each device holds B/n rows:
- "gathered" InfoNCE: every device all-gathers both embeddings (gradients flow back
  through the gather, as open_clip's `--gather-with-grad`) and computes the B x B logits.
- "local" InfoNCE: each device computes logits for its own rows only (b x B per
  direction), as open_clip's `--local-loss`; the loss value is the same.
- "ring" SigLIP: text chunks travel around the devices with `ppermute`; each device only
  ever holds b x b logits, so memory does not grow with the global batch (the chunked
  form of the SigLIP paper, section 3.3).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec

from vlp_jax import sharding

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
LOSS_KINDS = ("clip", "siglip")
CLIP_FORMS = ("auto", "gathered", "local")
SIGLIP_FORMS = ("auto", "full", "ring")


def clip_loss(
  image: jax.Array, text: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE over the whole batch (`logit_bias` is unused: softmax ignores it).

  Under plain jit with batch-sharded inputs, XLA inserts the gathers itself.
  """
  del logit_bias
  logits = logit_scale * image @ text.T
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  loss = (image_to_text.mean() + text_to_image.mean()) / 2
  accuracy = (jnp.argmax(logits, axis=1) == labels).mean()
  return loss, {"loss": loss, "train_i2t_accuracy": accuracy}


def negclip_loss(
  image: jax.Array, text: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NegCLIP's loss on L2-normalised embeddings (a `losses.LossFn`; bias unused).

  image: (2B, D) = [images; hard images]; text: (4B, D) = [captions; hard captions;
  negatives; hard negatives], so image j's caption is text j and its swapped negative
  text 2B + j. Image->text cross-entropy runs over all 4B texts, text->image over the
  first 2B texts only (a negative caption has no image); the loss is their mean.
  Metrics: "train_i2t_accuracy" (top-1 over the 4B texts) and "train_swap_accuracy"
  (the caption scores above its own swapped negative).
  """
  del logit_bias
  num_images = image.shape[0]
  if text.shape[0] != 2 * num_images:
    raise ValueError(
      f"NegCLIP needs twice as many texts as images; got {text.shape[0]} texts for "
      f"{num_images} images"
    )
  logits = logit_scale * image @ text.T  # (2B, 4B)
  labels = jnp.arange(num_images)
  ce = optax.softmax_cross_entropy_with_integer_labels
  image_to_text = ce(logits, labels).mean()
  text_to_image = ce(logits[:, :num_images].T, labels).mean()
  loss = (image_to_text + text_to_image) / 2
  positive = logits[labels, labels]
  swapped = logits[labels, labels + num_images]
  return loss, {
    "loss": loss,
    "train_i2t_accuracy": (jnp.argmax(logits, axis=1) == labels).mean(),
    "train_swap_accuracy": (positive > swapped).mean(),
  }


def _sigmoid_block(
  image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array, positive_diagonal: bool
) -> tuple[jax.Array, jax.Array]:
  """(sum of -log sigmoid(z * logit) over the block, per-row best logit among negatives)."""
  logits = scale * image @ text.T + bias
  signs = 2 * jnp.eye(*logits.shape, dtype=logits.dtype) - 1 if positive_diagonal else -1.0
  negative_best = jnp.where(
    jnp.eye(*logits.shape, dtype=bool) if positive_diagonal else False, -jnp.inf, logits
  ).max(axis=1)
  return -jax.nn.log_sigmoid(signs * logits).sum(), negative_best


def siglip_loss(
  image: jax.Array, text: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SigLIP's pairwise sigmoid loss over the full B x B logits, normalised by B."""
  total, negative_best = _sigmoid_block(image, text, logit_scale, logit_bias, True)
  loss = total / image.shape[0]
  positive = logit_scale * jnp.sum(image * text, axis=1) + logit_bias
  return loss, {"loss": loss, "train_i2t_accuracy": (positive > negative_best).mean()}


def _shard_mapped(mesh: Mesh, body: Callable) -> LossFn:
  """Wraps body(image_shard, text_shard, scale, bias) as a loss over global arrays."""
  rows = PartitionSpec(sharding.batch_axes(mesh))
  mapped = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(rows, rows, PartitionSpec(), PartitionSpec()),
    out_specs=(PartitionSpec(), PartitionSpec()),
  )

  def loss_fn(image, text, logit_scale, logit_bias=None):
    bias = jnp.zeros((), image.dtype) if logit_bias is None else logit_bias
    return mapped(image, text, logit_scale, bias)

  return loss_fn


def gathered_clip_loss(mesh: Mesh) -> LossFn:
  """InfoNCE on all-gathered features: each device computes the full B x B logits."""
  axes = sharding.batch_axes(mesh)

  def body(image, text, scale, bias):
    image_all = jax.lax.all_gather(image, axes, tiled=True)
    text_all = jax.lax.all_gather(text, axes, tiled=True)
    loss, metrics = clip_loss(image_all, text_all, scale)
    # Every device holds the same value; pmean makes that explicit to shard_map.
    return jax.lax.pmean(loss, axes), jax.lax.pmean(metrics, axes)

  return _shard_mapped(mesh, body)


def local_clip_loss(mesh: Mesh) -> LossFn:
  """InfoNCE where each device scores its own rows against all gathered columns."""
  axes = sharding.batch_axes(mesh)

  def body(image, text, scale, bias):
    local = image.shape[0]
    labels = jax.lax.axis_index(axes) * local + jnp.arange(local)
    image_all = jax.lax.all_gather(image, axes, tiled=True)
    text_all = jax.lax.all_gather(text, axes, tiled=True)
    image_to_text = scale * image @ text_all.T
    text_to_image = scale * text @ image_all.T
    ce = optax.softmax_cross_entropy_with_integer_labels
    loss = (ce(image_to_text, labels).mean() + ce(text_to_image, labels).mean()) / 2
    accuracy = (jnp.argmax(image_to_text, axis=1) == labels).mean()
    metrics = {"loss": loss, "train_i2t_accuracy": accuracy}
    # Equal shard sizes: the mean of the per-device means is the global mean.
    return jax.lax.pmean(loss, axes), jax.lax.pmean(metrics, axes)

  return _shard_mapped(mesh, body)


def ring_siglip_loss(mesh: Mesh) -> LossFn:
  """SigLIP with text chunks passed around a ring of devices (ppermute), b x b at a time."""
  axes = sharding.batch_axes(mesh)
  num_devices = sharding.batch_size_divisor(mesh)
  to_next = [(i, (i + 1) % num_devices) for i in range(num_devices)]

  def body(image, text, scale, bias):
    own_total, negative_best = _sigmoid_block(image, text, scale, bias, True)

    # Rematerialised: the backward pass recomputes each block's b x b logits instead of
    # keeping all n of them, so memory stays O(b^2) under value_and_grad too.
    @jax.checkpoint
    def visit(carry, _):
      text_chunk, total, best = carry
      text_chunk = jax.lax.ppermute(text_chunk, axes, to_next)
      block_total, block_best = _sigmoid_block(image, text_chunk, scale, bias, False)
      return (text_chunk, total + block_total, jnp.maximum(best, block_best)), None

    (_, total, negative_best), _ = jax.lax.scan(
      visit, (text, own_total, negative_best), None, length=num_devices - 1
    )
    global_batch = image.shape[0] * num_devices
    loss = jax.lax.psum(total, axes) / global_batch
    positive = scale * jnp.sum(image * text, axis=1) + bias
    accuracy = jax.lax.pmean((positive > negative_best).mean(), axes)
    return loss, {"loss": loss, "train_i2t_accuracy": accuracy}

  return _shard_mapped(mesh, body)


def create_loss(loss_config: ml_collections.ConfigDict, mesh: Mesh) -> LossFn:
  """`config.loss` -> loss_fn(image, text, logit_scale, logit_bias) over global arrays."""
  kind, form = loss_config.kind, loss_config.form
  if kind not in LOSS_KINDS:
    raise ValueError(f"config.loss.kind={kind!r} is not one of {LOSS_KINDS}")
  forms = {"clip": CLIP_FORMS, "siglip": SIGLIP_FORMS}[kind]
  if form not in forms:
    raise ValueError(f"config.loss.form={form!r} is not one of {forms} for {kind}")
  if kind == "clip":
    builders = {"auto": lambda _: clip_loss, "gathered": gathered_clip_loss}
    return builders.get(form, local_clip_loss)(mesh)
  if form == "ring":
    return ring_siglip_loss(mesh)
  return siglip_loss


# ---------------------------------------------------------------- fusion-model losses
# Image-text matching and masked language modelling, shared by ALBEF / CMask and VLC.


def sample_negatives(
  rng: jax.Array, similarity: jax.Array, exclude: jax.Array | None = None
) -> jax.Array:
  """(B,) one negative column per row, drawn from softmax(similarity[row]) with the
  row's positive (the diagonal) and `exclude` (B, B) bool (e.g. the same image in
  another row) left out: ALBEF's hard negatives.

  A row with nothing left to draw (B = 1) returns its own index.
  """
  rows = similarity.shape[0]
  banned = jnp.eye(rows, similarity.shape[1], dtype=bool)
  if exclude is not None:
    banned |= exclude
  logits = jnp.where(banned, -jnp.inf, jax.lax.stop_gradient(similarity).astype(jnp.float32))
  drawn = jax.random.categorical(rng, logits, axis=-1)
  return jnp.where(jnp.all(banned, axis=-1), jnp.arange(rows), drawn)


def masked_positions(selected: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """(positions (capacity,) int32 into selected.ravel(), kept (capacity,) bool): the
  selected positions in row-major order, the first `capacity` of them, then padding
  (position 0, kept False). A static-shape stand-in for nonzero(selected), so a head can
  run on the masked tokens only."""
  flat = selected.reshape(-1)
  (positions,) = jnp.nonzero(flat, size=capacity, fill_value=0)
  kept = jnp.arange(capacity) < jnp.sum(flat)
  return positions.astype(jnp.int32), kept


def itm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean 2-way cross-entropy of the matching head: logits (N, 2), labels (N,) 1 =
  matched pair, 0 = negative; with the head's accuracy."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return jnp.mean(loss), {"itm_accuracy": accuracy}


def mlm_loss(
  logits: jax.Array,
  targets: jax.Array,
  selected: jax.Array,
  soft_targets: jax.Array | None = None,
  alpha: float | jax.Array = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of logits (B, T, V) against the original ids `targets` (B, T), averaged
  over the `selected` (B, T) positions; with `soft_targets` (B, T, V) (a momentum model's
  probabilities), (1 - alpha) * that + alpha * the soft cross-entropy (ALBEF's
  distillation). 0 when nothing is selected. Any leading shape works: (K, V) logits of
  gathered positions (`masked_positions`) give the same loss as the full (B, T, V)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  hard = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  weights = selected.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  loss = jnp.sum(hard * weights) / count
  if soft_targets is not None:
    soft = -jnp.sum(jax.lax.stop_gradient(soft_targets) * log_probs, axis=-1)
    loss = (1 - alpha) * loss + alpha * jnp.sum(soft * weights) / count
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return loss, {"mlm_accuracy": jnp.sum(correct * weights) / count}
