"""Contrastive losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def clip_loss(
  image: jax.Array, text: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE over the whole (global) batch.

  `image` and `text` are L2-normalised (B, D) embeddings; row i of each is a positive
  pair. Under jit with batch-sharded inputs, XLA gathers the features across devices and
  gradients flow through the gather, as open_clip's `--gather-with-grad`.
  """
  logits = logit_scale * image @ text.T
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  loss = (image_to_text.mean() + text_to_image.mean()) / 2
  accuracy = (jnp.argmax(logits, axis=1) == labels).mean()
  return loss, {"loss": loss, "train_i2t_accuracy": accuracy}
