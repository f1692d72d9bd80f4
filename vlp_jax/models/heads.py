"""Prediction heads over a fusion / single-stream encoder's states (ALBEF, CMask, VLC)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.bert import ACTIVATIONS

_INIT = nn.initializers.normal(0.02)  # BERT's initializer_range.


class ItmHead(nn.Module):
  """Image-text matching: the pooled fused state (B, W) -> 2 logits (not matched, matched)."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    return nn.Dense(2, dtype=self.dtype, kernel_init=_INIT, name="itm_head")(pooled)


class MlmHead(nn.Module):
  """BERT's prediction head: Dense -> activation -> LayerNorm -> vocabulary logits.

  With `embedding` (V, W) given, the decoder is the word-embedding matrix (tied, as BERT
  and ALBEF) plus a bias; without, a Dense of its own (ViLT / VLC). Names follow Hugging
  Face's cls.predictions (transform, transform_ln, decoder, bias).
  """

  vocab_size: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, embedding: jax.Array | None = None) -> jax.Array:
    x = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_INIT, name="transform")(x)
    x = ACTIVATIONS[self.activation](x)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="transform_ln")(x)
    bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,))
    if embedding is None:
      kernel = self.param("decoder", _INIT, (x.shape[-1], self.vocab_size))
      logits = jnp.dot(x, kernel.astype(self.dtype))
    else:
      logits = jnp.dot(x, embedding.T.astype(self.dtype))
    return logits + bias.astype(self.dtype)
