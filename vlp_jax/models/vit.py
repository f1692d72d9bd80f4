"""Vision Transformer image tower (open_clip's VisionTransformer layout)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.layers import (
  LAYER_NORM_EPS,
  NO_TUNING,
  Transformer,
  Tuning,
  apply_dropout,
  layer_norm,
)

# name -> (width, depth, mlp_dim, num_heads). "mu" is our own demo size.
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
  "mu": (128, 4, 512, 4),
  "Ti": (192, 12, 768, 3),
  "S": (384, 12, 1536, 6),
  "M": (512, 12, 2048, 8),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
  "H": (1280, 32, 5120, 16),
  "g": (1408, 40, 6144, 16),
}

# VisionTransformer.pool: "cls" pools the class token, "mean" the patch tokens (timm's
# global_pool="avg"); either way ln_post normalises the pooled vector.
POOLS = ("cls", "mean")

# OpenAI CLIP's RGB statistics in [0, 255], as open_clip uses.
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


@dataclasses.dataclass(frozen=True)
class VitSize:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int


def decode_variant(variant: str, **overrides: int | None) -> VitSize:
  """ "B/16" -> VitSize(768, 12, 3072, 12, 16); non-None overrides replace fields."""
  name, sep, patch = variant.partition("/")
  if not sep or name not in VIT_SIZES or not patch.isdigit():
    raise ValueError(
      f"unknown ViT variant {variant!r}: expected NAME/PATCH with NAME in {sorted(VIT_SIZES)}"
    )
  size = VitSize(*VIT_SIZES[name], patch_size=int(patch))
  return dataclasses.replace(size, **{k: v for k, v in overrides.items() if v is not None})


def normalize_pixels(
  images: jax.Array, mean: Sequence[float], std: Sequence[float], dtype: jnp.dtype
) -> jax.Array:
  """uint8 (or float in [0, 255]) RGB -> per-channel standardised floats."""
  images = images.astype(jnp.float32)
  return ((images - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def embed_patches(
  images: jax.Array,
  size: VitSize,
  image_size: int,
  mean: Sequence[float],
  std: Sequence[float],
  dtype: jnp.dtype,
  bias: bool,
) -> jax.Array:
  """Pixels (B, S, S, 3) in [0, 255] -> patch tokens (B, L, width): standardised, then the
  calling module's patch convolution "conv1" (open_clip's and timm's name). For the
  compact methods of the ViT and of VLC's single stream."""
  if images.shape[1] != image_size or images.shape[2] != image_size:
    raise ValueError(f"images are {images.shape[1:3]}, model expects {image_size} px")
  x = normalize_pixels(images, mean, std, dtype)
  x = nn.Conv(
    size.width,
    (size.patch_size, size.patch_size),
    strides=size.patch_size,
    padding="VALID",
    use_bias=bias,
    dtype=dtype,
    name="conv1",
  )(x)
  return x.reshape(x.shape[0], -1, size.width)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, patch_size * patch_size * C), row-major patches."""
  b, h, w, c = images.shape
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch_size * patch_size * c)


class VisionTransformer(nn.Module):
  """ViT with a class token, taking pixel values in [0, 255].

  `keep_indices` (B, K) selects which patch tokens enter the encoder (masking); the
  class token is always kept. Returns (embedding, aux) where aux holds `pre_logits`.

  The defaults are open_clip's ViT; timm / MAE checkpoints need layer_norm_eps=1e-6,
  patch_bias=True, pre_norm=False and, for models fine-tuned with average pooling and
  fc_norm, pool="mean" (vlp_jax.weights.timm_vit).
  """

  size: VitSize
  image_size: int
  embed_dim: int
  mean: Sequence[float] = CLIP_MEAN
  std: Sequence[float] = CLIP_STD
  activation: str = "gelu"
  remat: bool | str = "none"  # A stacking.REMAT_POLICIES name.
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING  # Adapters / LoRA (config.peft).
  layer_norm_eps: float = LAYER_NORM_EPS  # Every layer norm's epsilon (timm: 1e-6).
  patch_bias: bool = False  # A bias on the patch embedding conv1 (timm, MAE).
  pre_norm: bool = True  # ln_pre after the embeddings (CLIP); timm / MAE ViTs have none.
  pool: str = "cls"  # One of POOLS: the class token, or the mean of the patch tokens.
  # One nn.scan over stacked blocks (config.model.scan_layers; layers.Transformer).
  scan_layers: bool = False
  attention: str = "auto"  # config.model.attention (attention.dot_product_attention).
  # timm's drop_rate (after the position embeddings, attention output and MLP) and
  # attn_drop_rate (attention probabilities): config.model.image.dropout /
  # attention_dropout. Runs only where apply gets a "dropout" rng (layers.apply_dropout).
  dropout: float = 0.0
  attention_dropout: float = 0.0

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.size.patch_size) ** 2

  @nn.compact
  def __call__(
    self, images: jax.Array, keep_indices: jax.Array | None = None, all_tokens: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """With `all_tokens`, aux also holds "tokens": every output token through ln_post
    (B, 1 + kept patches, width), what a fusion encoder attends to (ALBEF)."""
    size = self.size
    if self.pool not in POOLS:
      raise ValueError(f"VisionTransformer.pool={self.pool!r} is not one of {POOLS}")
    x = embed_patches(
      images, size, self.image_size, self.mean, self.std, self.dtype, self.patch_bias
    )
    scale = size.width**-0.5
    class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (size.width,))
    positional_embedding = self.param(
      "positional_embedding", nn.initializers.normal(scale), (self.num_patches + 1, size.width)
    )
    x = x + positional_embedding[1:].astype(self.dtype)
    if keep_indices is not None:
      x = jnp.take_along_axis(x, keep_indices[..., None], axis=1)
    cls = (class_embedding + positional_embedding[0]).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, size.width)), x], axis=1)
    x = apply_dropout(self, x, self.dropout)
    if self.pre_norm:
      x = layer_norm("ln_pre", self.dtype, self.layer_norm_eps)(x)
    x = Transformer(
      size.depth,
      size.num_heads,
      size.mlp_dim,
      causal=False,
      activation=self.activation,
      remat=self.remat,
      dtype=self.dtype,
      tuning=self.tuning,
      layer_norm_eps=self.layer_norm_eps,
      scan_layers=self.scan_layers,
      attention=self.attention,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      name="transformer",
    )(x)
    ln_post = layer_norm("ln_post", self.dtype, self.layer_norm_eps)
    pooled = ln_post(x[:, 0] if self.pool == "cls" else jnp.mean(x[:, 1:], axis=1))
    proj = self.param("proj", nn.initializers.normal(scale), (size.width, self.embed_dim))
    aux = {"pre_logits": pooled}
    if all_tokens:
      aux["tokens"] = ln_post(x)
    return pooled @ proj.astype(self.dtype), aux
