"""BERT-style bidirectional text tower (BERT, MiniLM, SimCSE encoders), CLS or mean pooled.

Post-LN encoder layers with padding-masked attention, laid out so a Hugging Face
`BertModel` state dict maps one to one (weights.hf_bert.import_hf_bert):

  embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
  layer_<i>/{query, key, value, attention_output, attention_ln,
             intermediate, output, output_ln}
  text_projection  (Dense with bias; absent when embed_dim is None or 0)

With adapters (LilT), `adapter_attn` follows the attention output projection and
`adapter_mlp` the FFN output projection, each before its residual LayerNorm:
LN(adapter(dense(h)) + residual). Every linear layer of the encoder goes through
`layers.dense`, so LoRA applies by layer name (query, key, value, attention_output,
intermediate, output).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import attention, layers
from vlp_jax.models.layers import NO_TUNING, Tuning
from vlp_jax.models.stacking import with_remat

POOLINGS = ("cls", "mean")

# Hugging Face's `hidden_act` names these cover: gelu (erf), gelu_new / gelu_pytorch_tanh
# (tanh approximation), relu.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
  "relu": nn.relu,
}

_INIT = nn.initializers.normal(0.02)  # BERT's initializer_range.


def mean_pool(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x (B, T, W) over the positions where mask (B, T) is true (0 for none)."""
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
  return (total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(x.dtype)


class BertLayer(nn.Module):
  """Post-LN encoder layer: h = LN(x + attn(x)); LN(h + ffn(h)).

  The two halves are methods so that fusion.FusionLayer inserts cross-attention between
  them with the same parameter names.
  """

  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  attention: str = "auto"  # config.model.attention: "auto", "xla" or "cudnn".
  # BERT's hidden_dropout_prob: on each sub-layer's output projection, before its
  # adapter and residual LayerNorm (config.model.text.dropout).
  dropout: float = 0.0
  # BERT's attention_probs_dropout_prob, self- and cross-attention alike
  # (config.model.text.attention_dropout).
  attention_dropout: float = 0.0

  def _dense(self, features: int, name: str) -> layers.Dense:
    return layers.dense(features, name, self.tuning, self.dtype, kernel_init=_INIT)

  def _ln(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)

  def _heads(self, x: jax.Array, name: str, width: int) -> jax.Array:
    """x (B, L, any width) -> (B, L, heads, width // heads) through the Dense `name`."""
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    h = self._dense(width, name)(x)
    return h.reshape(*x.shape[:2], self.num_heads, width // self.num_heads)

  def self_attention(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """LN(x + attention over x); mask (B, T) true at the tokens attention may look at."""
    batch, length, width = x.shape
    attended = attention.dot_product_attention(
      self._heads(x, "query", width),
      self._heads(x, "key", width),
      self._heads(x, "value", width),
      self.attention,
      padding_mask=mask,
      dropout_rate=self.attention_dropout,
      dropout_rng=layers.attention_dropout_rng(self, self.attention_dropout),
    ).reshape(batch, length, width)
    h = self._dense(width, "attention_output")(attended)
    h = layers.apply_dropout(self, h, self.dropout)
    h = layers.maybe_adapter(h, "adapter_attn", self.tuning, self.dtype)
    return self._ln("attention_ln")(h + x)

  def feed_forward(self, x: jax.Array) -> jax.Array:
    h = ACTIVATIONS[self.activation](self._dense(self.mlp_dim, "intermediate")(x))
    h = layers.apply_dropout(self, self._dense(x.shape[-1], "output")(h), self.dropout)
    h = layers.maybe_adapter(h, "adapter_mlp", self.tuning, self.dtype)
    return self._ln("output_ln")(h + x)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, T, W); mask (B, T) true at the tokens attention may look at."""
    return self.feed_forward(self.self_attention(x, mask))


class BertEmbeddings(nn.Module):
  """word + position + token-type embeddings, then LayerNorm (and dropout)."""

  vocab_size: int
  max_positions: int
  width: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32
  dropout: float = 0.0  # BERT's hidden_dropout_prob, after the LayerNorm.

  @classmethod
  def of(cls, tower: nn.Module, dropout: float = 0.0) -> BertEmbeddings:
    """The "embeddings" of a BERT tower (BertTextTower, ALBEF's AlbefText), from its
    vocab_size, context_length, width, type_vocab_size, layer_norm_eps and dtype."""
    return cls(
      tower.vocab_size,
      tower.context_length,
      tower.width,
      tower.type_vocab_size,
      tower.layer_norm_eps,
      tower.dtype,
      dropout=dropout,
      name="embeddings",
    )

  @nn.compact
  def __call__(self, tokens: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    def embed(num: int, name: str, ids: jax.Array) -> jax.Array:
      return nn.Embed(num, self.width, embedding_init=_INIT, name=name)(ids).astype(self.dtype)

    positions = jnp.arange(tokens.shape[-1])[None]
    x = (
      embed(self.vocab_size, "word_embeddings", tokens)
      + embed(self.max_positions, "position_embeddings", positions)
      + embed(self.type_vocab_size, "token_type_embeddings", token_type_ids)
    )
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
    return layers.apply_dropout(self, x, self.dropout)


class BertTextTower(nn.Module):
  """Bidirectional BERT encoder over token ids (B, T) with [CLS] or mean pooling.

  Same interface as text.TextTransformer: returns (embedding, aux) where embedding is
  text_projection(pooled) (B, embed_dim), or the pooled vector (B, width) itself when
  embed_dim is None or 0 (sentence-embedding use), and aux holds "pre_logits" (pooled)
  and "hidden_states" (the last layer's output, (B, T, width)). Tokens equal to pad_id
  are masked out of attention and of mean pooling; every text is one segment
  (token type 0) unless token_type_ids are given.
  """

  vocab_size: int
  context_length: int  # Position embeddings held: the longest token sequence accepted.
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  embed_dim: int | None
  pooling: str = "cls"  # "cls": the first token's state; "mean": mean over non-pad tokens.
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"  # A key of ACTIVATIONS ("gelu" is exact, erf-based).
  remat: bool | str = "none"  # A stacking.REMAT_POLICIES name.
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING  # Adapters / LoRA (config.peft).
  pad_id: int = 0
  attention: str = "auto"  # config.model.attention: "auto", "xla" or "cudnn".

  @nn.compact
  def __call__(
    self, tokens: jax.Array, token_type_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} is not one of {tuple(ACTIVATIONS)}")
    length = tokens.shape[-1]
    if length > self.context_length:
      raise ValueError(f"{length} tokens exceed context_length {self.context_length}")
    mask = tokens != self.pad_id
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(tokens)
    x = BertEmbeddings.of(self)(tokens, token_type_ids)
    layer_cls = with_remat(BertLayer, self.remat)
    for i in range(self.depth):
      x = layer_cls(
        self.num_heads,
        self.mlp_dim,
        self.activation,
        self.layer_norm_eps,
        self.dtype,
        self.tuning,
        attention=self.attention,
        name=f"layer_{i}",
      )(x, mask)
    pooled = x[:, 0] if self.pooling == "cls" else mean_pool(x, mask)
    aux = {"pre_logits": pooled, "hidden_states": x}
    if not self.embed_dim:
      return pooled, aux
    # A plain Dense (no LoRA): the projection is new and trains whole under every preset.
    projection = layers.Dense(
      self.embed_dim,
      kernel_init=nn.initializers.normal(self.width**-0.5),
      dtype=self.dtype,
      name="text_projection",
    )
    return projection(pooled), aux
