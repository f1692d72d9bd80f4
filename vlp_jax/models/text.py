"""CLIP causal text transformer (open_clip's TextTransformer layout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.layers import NO_TUNING, Transformer, Tuning, layer_norm

PAD_ID = 0


def last_token_index(tokens: jax.Array, pad_id: int = PAD_ID) -> jax.Array:
  """Index of the last non-pad token: the end-of-text token of every tokeniser here.

  The last position whose id is not `pad_id`, so ids equal to `pad_id` inside a text
  (CLIP's BPE pads with 0, which is also the token "!") do not shift it. Equals
  open_clip's `argmax(tokens)` pooling for CLIP's BPE (EOT has the largest id and is
  followed only by padding) without depending on the vocabulary's id order. 0 for a row
  of padding only.
  """
  positions = jnp.arange(tokens.shape[-1])
  return jnp.max(jnp.where(tokens != pad_id, positions, 0), axis=-1)


class TextTransformer(nn.Module):
  """Causal transformer over token ids (B, T); pools the end-of-text token."""

  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  embed_dim: int
  activation: str = "gelu"
  remat: bool | str = "none"  # A stacking.REMAT_POLICIES name.
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING  # Adapters / LoRA (config.peft).
  pad_id: int = PAD_ID  # The tokeniser's padding id; pooling skips trailing padding.
  # One nn.scan over stacked blocks (config.model.scan_layers; layers.Transformer).
  scan_layers: bool = False
  attention: str = "auto"  # config.model.attention (attention.dot_product_attention).

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    if tokens.shape[-1] > self.context_length:
      raise ValueError(f"{tokens.shape[-1]} tokens exceed context_length {self.context_length}")
    x = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      name="token_embedding",
    )(tokens).astype(self.dtype)
    positional_embedding = self.param(
      "positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width)
    )
    x = x + positional_embedding[: tokens.shape[-1]].astype(self.dtype)
    x = Transformer(
      self.depth,
      self.num_heads,
      self.mlp_dim,
      causal=True,
      activation=self.activation,
      remat=self.remat,
      dtype=self.dtype,
      tuning=self.tuning,
      scan_layers=self.scan_layers,
      attention=self.attention,
      name="transformer",
    )(x)
    x = layer_norm("ln_final", self.dtype)(x)
    end = last_token_index(tokens, self.pad_id)
    pooled = jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]
    projection = self.param(
      "text_projection", nn.initializers.normal(self.width**-0.5), (self.width, self.embed_dim)
    )
    return pooled @ projection.astype(self.dtype), {"pre_logits": pooled}
