"""Cross-attention from text to image tokens: ALBEF's fusion layers and CMask's agent.

A FusionLayer is a BERT layer (models.bert.BertLayer, same parameter names) with
cross-attention between its self-attention and its feed-forward half, laid out like
Hugging Face's `crossattention` block so a checkpoint that has one maps one to one:

  cross_query, cross_key, cross_value, cross_output, cross_ln

Each layer also returns the information flow from the image into every text token:
the norm of the attention-weighted, value-projected image tokens, ||sum_j A[i, j] v_j||
over all heads (Kobayashi et al., 2020: attention weights alone overstate tokens with
small values). CMask's agent is rewarded with it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import layers
from vlp_jax.models.bert import BertLayer


def information_flow(attention: jax.Array, values: jax.Array) -> jax.Array:
  """||concat_h sum_j attention[b, h, i, j] values[b, j, h]|| per text token: (B, T).

  attention (B, H, T, N) are softmax weights over the N image tokens, values
  (B, N, H, D) the value-projected image tokens.
  """
  context = jnp.einsum("bhtn,bnhd->bthd", attention.astype(jnp.float32), values.astype(jnp.float32))
  return jnp.sqrt(jnp.sum(jnp.square(context), axis=(-2, -1)))


class FusionLayer(BertLayer):
  """LN(x + self-attn(x)) -> LN(h + cross-attn(h, image)) -> LN(. + ffn(.)).

  Returns (text states (B, T, W), information flow (B, T)). The image tokens (B, N, Wi)
  may be wider or narrower than the text (ALBEF: ViT width = BERT width, both 768).
  """

  def cross_attention(
    self, x: jax.Array, image: jax.Array, image_index: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    batch, length, width = x.shape
    q = self._heads(x, "cross_query", width)
    k = self._heads(image, "cross_key", width)
    v = self._heads(image, "cross_value", width)
    if image_index is not None:
      # Keys and values once per distinct image, then one copy per text row: ALBEF's ITM
      # rows reuse each image up to four times, and the (N, Wi) x (Wi, W) projections
      # are most of a fusion layer's work.
      k, v = k[image_index], v[image_index]
    # Explicit softmax (not the fused kernel): the flow needs the weights, and with a
    # few dozen text tokens the (T, N) matrix is small.
    scale = (width // self.num_heads) ** -0.5
    logits = jnp.einsum("bthd,bnhd->bhtn", q, k).astype(jnp.float32) * scale
    attention = jax.nn.softmax(logits, axis=-1)
    # Dropout (BERT's, as ALBEF's cross-attention) reaches the context, not the flow:
    # the flow measures where the layer attends, without the training noise.
    dropped = layers.apply_dropout(self, attention, self.attention_dropout)
    context = jnp.einsum("bhtn,bnhd->bthd", dropped.astype(self.dtype), v)
    h = self._dense(width, "cross_output")(context.reshape(batch, length, width))
    h = layers.apply_dropout(self, h, self.dropout)
    return self._ln("cross_ln")(h + x), information_flow(attention, v)

  @nn.compact
  def __call__(  # type: ignore[override]
    self, x: jax.Array, mask: jax.Array, image: jax.Array, image_index: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """x (B, T, W), mask (B, T) true at attendable text tokens, image (B, N, Wi); or
    image (M, N, Wi) and image_index (B,) int: text row b attends to image[image_index[b]]."""
    x, flow = self.cross_attention(self.self_attention(x, mask), image, image_index)
    return self.feed_forward(x), flow
