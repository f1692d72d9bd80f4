"""Single-stream vision-language transformer (ViLT / VLC) with an MAE pixel decoder.

One pre-LN ViT encoder (timm / MAE layout) reads [text tokens; image CLS; visible patch
tokens]. Text: word + learned position embeddings and a LayerNorm (BERT's embedding
layer, random init); image: patch embeddings plus MAE's fixed 2-D sin-cos positions and
a class token. Every token also gets a token-type embedding (0 text, 1 image, 2 NLVR2's
second image). Padded text positions are masked out as keys in every block, so nothing
attends to them.

Pooling follows ViLT and VLC: the FIRST token (the text's [CLS]) after the final norm,
through a dense + tanh pooler; the image's class token stays in `image[:, 0]` for
anyone who wants it. The MAE decoder (512 wide, 8 blocks, 16 heads in VLC) reads the
FUSED image tokens (after the encoder, so they are text-conditioned), puts mask tokens
at the dropped patches and predicts every patch's pixels.

Parameter names follow the repo's ViT (conv1, class_embedding, transformer/resblocks_i
with ln_1 / attn.in_proj / attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj, ln_post), so
the tensor-parallel rules apply and a timm / MAE checkpoint maps one to one
(`weights.timm_vit.import_mae_into_vlc`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.models import attention, layers, stacking
from vlp_jax.models.heads import ItmHead, MlmHead
from vlp_jax.models.vit import CLIP_MEAN, CLIP_STD, VitSize, embed_patches

TEXT_TYPE, IMAGE_TYPE, SECOND_IMAGE_TYPE = 0, 1, 2
TYPE_VOCAB = 3
_BERT_INIT = nn.initializers.normal(0.02)  # ViLT's init of its embeddings and heads.


def sincos_positions(width: int, grid: int, class_row: bool = True) -> np.ndarray:
  """MAE's fixed 2-D sin-cos positions, (grid * grid [+ 1], width) float32.

  Patches in row-major order. The first half of the channels encodes the column, the
  second half the row; each half is [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (width
  / 4)). With `class_row`, a zero row for the class token comes first (as MAE's).
  """
  if width % 4:
    raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

  def encode(position: np.ndarray) -> np.ndarray:
    angles = position.reshape(-1, 1) * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  table = np.concatenate([encode(cols), encode(rows)], axis=1)
  if class_row:
    table = np.concatenate([np.zeros((1, width)), table])
  return table.astype(np.float32)


class MaskedAttention(nn.Module):
  """layers.Attention (same parameter names and init) with a key mask: (B, L) bool, true
  at the tokens attention may look at; None attends everywhere."""

  num_heads: int
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32
  dropout: float = 0.0  # layers.Attention's.
  attention_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    qkv = layers.dense(
      3 * width,
      "in_proj",
      layers.NO_TUNING,
      self.dtype,
      kernel_init=nn.initializers.normal(width**-0.5),
    )(x)
    head_dim = width // self.num_heads
    q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, head_dim), 3, axis=2)
    # Not cuDNN: its key lengths assume trailing padding, and the text's padding sits
    # between the text and the image tokens.
    out = attention.dot_product_attention(
      q,
      k,
      v,
      "xla",
      padding_mask=mask,
      dropout_rate=self.attention_dropout,
      dropout_rng=layers.attention_dropout_rng(self, self.attention_dropout),
    )
    out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
    out = layers.dense(
      width, "out_proj", layers.NO_TUNING, self.dtype, kernel_init=nn.initializers.normal(out_std)
    )(out.reshape(batch, length, width))
    return layers.apply_dropout(self, out, self.dropout)


class MaskedBlock(nn.Module):
  """layers.ResidualBlock with a key mask: x + attn(ln_1(x), mask); x + mlp(ln_2(x))."""

  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32
  layer_norm_eps: float = 1e-6
  dropout: float = 0.0  # timm's drop_rate (VLC's blocks: 0).
  attention_dropout: float = 0.0  # timm's attn_drop_rate (VLC's blocks: 0).

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    ln = lambda name: layers.layer_norm(name, self.dtype, self.layer_norm_eps)  # noqa: E731
    x = x + MaskedAttention(
      self.num_heads,
      self.out_init_std,
      self.dtype,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      name="attn",
    )(ln("ln_1")(x), mask)
    mlp = layers.Mlp(
      self.mlp_dim, self.activation, self.out_init_std, self.dtype, dropout=self.dropout, name="mlp"
    )
    return x + mlp(ln("ln_2")(x))


class MaskedTransformer(nn.Module):
  """MaskedBlocks named resblocks_<i> (layers.Transformer's names and output init)."""

  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  remat: bool | str = "none"
  dtype: jnp.dtype = jnp.float32
  layer_norm_eps: float = 1e-6
  dropout: float = 0.0  # MaskedBlock's.
  attention_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    out_std = x.shape[-1] ** -0.5 * (2 * self.depth) ** -0.5
    block_cls = stacking.with_remat(MaskedBlock, self.remat)
    for i in range(self.depth):
      x = block_cls(
        self.num_heads,
        self.mlp_dim,
        self.activation,
        out_std,
        self.dtype,
        self.layer_norm_eps,
        dropout=self.dropout,
        attention_dropout=self.attention_dropout,
        name=f"resblocks_{i}",
      )(x, mask)
    return x


class TextEmbedding(nn.Module):
  """BERT's embedding layer without its own token types: LN(word + learned position),
  then dropout (VLC's drop_rate 0.1 reaches only here: vlc/modules/vlc_module.py builds
  BertEmbeddings with it and its ViT blocks without)."""

  vocab_size: int
  max_positions: int
  width: int
  layer_norm_eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32
  dropout: float = 0.0  # config.model.text.dropout.

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.shape[1] > self.max_positions:
      raise ValueError(
        f"{tokens.shape[1]} text tokens, the model has {self.max_positions} positions"
      )
    words = nn.Embed(self.vocab_size, self.width, embedding_init=_BERT_INIT, name="token_embedding")
    positions = self.param("positional_embedding", _BERT_INIT, (self.max_positions, self.width))
    x = words(tokens) + positions[None, : tokens.shape[1]]
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="ln")(x.astype(self.dtype))
    return layers.apply_dropout(self, x, self.dropout)


class SingleStreamEncoder(nn.Module):
  """The ViT encoder over [text; image CLS; kept patches].

  Returns (text states (B, T, W), image states (B, 1 + K, W)), both after the final
  norm (ln_post). `keep_indices` (B, K) are the visible patches (None: all of them).
  """

  size: VitSize
  image_size: int
  vocab_size: int
  max_text_positions: int
  pad_id: int
  mean: Sequence[float] = CLIP_MEAN
  std: Sequence[float] = CLIP_STD
  activation: str = "gelu"
  remat: bool | str = "none"
  dtype: jnp.dtype = jnp.float32
  layer_norm_eps: float = 1e-6  # timm / MAE.
  text_layer_norm_eps: float = 1e-12  # BERT's embedding LayerNorm.
  patch_bias: bool = True  # timm / MAE.
  # Dropout where apply gets a "dropout" rng (layers.apply_dropout): on the text
  # embeddings (config.model.text.dropout; VLC: 0.1) and in the blocks
  # (config.model.image.dropout / attention_dropout; VLC: 0).
  text_dropout: float = 0.0
  dropout: float = 0.0
  attention_dropout: float = 0.0

  @property
  def grid(self) -> int:
    return self.image_size // self.size.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid**2

  @nn.compact
  def __call__(
    self,
    images: jax.Array,
    tokens: jax.Array,
    keep_indices: jax.Array | None = None,
    image_type: int = IMAGE_TYPE,
    text_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """`text_mask` (B, T): the text tokens attention may look at; None: the non-pad ones.
    (MLM passes the original caption's: a random replacement may be the pad id.)"""
    size = self.size
    types = self.param("token_type_embedding", _BERT_INIT, (TYPE_VOCAB, size.width))
    text = TextEmbedding(
      self.vocab_size,
      self.max_text_positions,
      size.width,
      self.text_layer_norm_eps,
      self.dtype,
      dropout=self.text_dropout,
      name="text_embed",
    )(tokens)
    text = text + types[TEXT_TYPE].astype(self.dtype)

    x = embed_patches(
      images, size, self.image_size, self.mean, self.std, self.dtype, self.patch_bias
    )
    positions = jnp.asarray(sincos_positions(size.width, self.grid), self.dtype)
    x = x + positions[1:]
    if keep_indices is not None:
      x = jnp.take_along_axis(x, keep_indices[..., None], axis=1)
    class_embedding = self.param("class_embedding", _BERT_INIT, (size.width,))
    cls = (class_embedding.astype(self.dtype) + positions[0])[None, None]
    image = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, size.width)), x], axis=1)
    image = image + types[image_type].astype(self.dtype)

    # Keys: real text tokens and every image token; padding is never looked at.
    text_mask = tokens != self.pad_id if text_mask is None else text_mask
    mask = jnp.concatenate([text_mask, jnp.ones(image.shape[:2], bool)], axis=1)
    x = MaskedTransformer(
      size.depth,
      size.num_heads,
      size.mlp_dim,
      self.activation,
      self.remat,
      self.dtype,
      self.layer_norm_eps,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      name="transformer",
    )(jnp.concatenate([text, image], axis=1), mask)
    x = layers.layer_norm("ln_post", self.dtype, self.layer_norm_eps)(x)
    return x[:, : tokens.shape[1]], x[:, tokens.shape[1] :]


class MaeDecoder(nn.Module):
  """MAE's decoder: fused image tokens (B, 1 + K, W) -> pixels of every patch (B, L, P*P*3).

  embed (Dense to `width`) -> mask tokens at the dropped patches -> fixed sin-cos
  positions -> blocks -> ln -> pred; the class token's row is dropped at the end.
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  grid: int
  patch_size: int
  activation: str = "gelu"
  remat: bool | str = "none"
  dtype: jnp.dtype = jnp.float32
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, image: jax.Array, keep_indices: jax.Array | None = None) -> jax.Array:
    dense = lambda n, name: nn.Dense(  # noqa: E731
      n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name=name
    )
    x = dense(self.width, "embed")(image)
    mask_token = self.param("mask_token", _BERT_INIT, (self.width,))
    if keep_indices is not None:
      batch = x.shape[0]
      full = jnp.broadcast_to(mask_token.astype(self.dtype), (batch, self.grid**2, self.width))
      # Visible tokens back at their patch positions (MAE's unshuffle), mask tokens elsewhere.
      full = full.at[jnp.arange(batch)[:, None], keep_indices].set(x[:, 1:])
      x = jnp.concatenate([x[:, :1], full], axis=1)
    x = x + jnp.asarray(sincos_positions(self.width, self.grid), self.dtype)
    x = MaskedTransformer(
      self.depth,
      self.num_heads,
      self.mlp_dim,
      self.activation,
      self.remat,
      self.dtype,
      self.layer_norm_eps,
      name="transformer",
    )(x)
    x = layers.layer_norm("ln", self.dtype, self.layer_norm_eps)(x)
    return dense(self.patch_size**2 * 3, "pred")(x)[:, 1:]


class SingleStream(nn.Module):
  """VLC: encoder, pooler, ITM and MLM heads, MAE decoder.

  `encode` gives the states, the heads and `reconstruct` read them (a training step runs
  the heads on parts of one encoder pass); __call__ runs everything and returns a dict:
  "text" (B, T, W) and "image" (B, 1 + K, W) states, "pooled" (B, W), and as asked
  "mlm_logits" (B, T, V), "itm_logits" (B, 2), "pixels" (B, L, P*P*3: predictions for
  every patch, in `vit.patchify` order).
  """

  encoder: SingleStreamEncoder
  decoder: MaeDecoder

  def setup(self) -> None:
    dtype = self.encoder.dtype
    width = self.encoder.size.width
    self.pooler = nn.Dense(width, dtype=dtype, kernel_init=_BERT_INIT)
    # BERT's head (exact gelu), whatever the encoder's activation.
    self.mlm_head = MlmHead(self.encoder.vocab_size, dtype=dtype)
    self.itm_head = ItmHead(dtype)

  def encode(
    self,
    images: jax.Array,
    tokens: jax.Array,
    keep_indices: jax.Array | None = None,
    image_type: int = IMAGE_TYPE,
    text_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(text states, image states, pooled): the pooler reads the first token, the
    text's [CLS] (ViLT's and VLC's choice)."""
    text, image = self.encoder(images, tokens, keep_indices, image_type, text_mask)
    first = text[:, 0] if text.shape[1] else image[:, 0]
    return text, image, jnp.tanh(self.pooler(first))

  def mlm_logits(self, text: jax.Array) -> jax.Array:
    return self.mlm_head(text)

  def itm_logits(self, pooled: jax.Array) -> jax.Array:
    return self.itm_head(pooled)

  def reconstruct(self, image: jax.Array, keep_indices: jax.Array | None) -> jax.Array:
    return self.decoder(image, keep_indices)

  def __call__(
    self,
    images: jax.Array,
    tokens: jax.Array,
    keep_indices: jax.Array | None = None,
    *,
    image_type: int = IMAGE_TYPE,
    mlm: bool = True,
    itm: bool = True,
    reconstruct: bool = True,
  ) -> dict[str, jax.Array]:
    text, image, pooled = self.encode(images, tokens, keep_indices, image_type)
    out = {"text": text, "image": image, "pooled": pooled}
    if mlm:
      out["mlm_logits"] = self.mlm_logits(text)
    if itm:
      out["itm_logits"] = self.itm_logits(pooled)
    if reconstruct:
      out["pixels"] = self.reconstruct(image, keep_indices)
    return out

  def init_params(self, rng: jax.Array, text_length: int) -> dict:
    """Every parameter (all heads and the decoder), from dummy inputs."""
    size = self.encoder.image_size
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    return self.init(rng, images, jnp.zeros((1, text_length), jnp.int32))["params"]
