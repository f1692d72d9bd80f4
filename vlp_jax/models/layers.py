"""Transformer building blocks shared by the image and text towers.

Parameter names follow open_clip's state dict (ln_1, attn.in_proj, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj, resblocks_<i>) so checkpoints map one to one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax import sharding
from vlp_jax.models.attention import dot_product_attention
from vlp_jax.models.stacking import STACKED_BLOCKS, with_remat

# torch.nn.LayerNorm's default; flax's is 1e-6. Needed for parity with open_clip.
LAYER_NORM_EPS = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "quick_gelu": quick_gelu,
}


def layer_norm(name: str, dtype: jnp.dtype, eps: float = LAYER_NORM_EPS) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Parameter-efficient additions to every transformer block (config.peft).

  adapter_reduction > 0 adds LilT's bottleneck adapters x + up(gelu(down(x))) of width
  width // adapter_reduction; lora_rank > 0 adds a low-rank update (alpha / rank) * x A B to
  the Dense layers named in lora_targets (empty: all of them). Both start as the identity
  (up and B are zero-initialised), so a pretrained tower's outputs are unchanged at step 0.
  """

  adapter_reduction: int = 0
  lora_rank: int = 0
  lora_alpha: float = 32.0
  lora_targets: tuple[str, ...] = ()

  def lora_rank_for(self, name: str) -> int:
    return self.lora_rank if not self.lora_targets or name in self.lora_targets else 0


NO_TUNING = Tuning()


def _symmetric_uniform(bound: float) -> Callable:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Dense(nn.Module):
  """nn.Dense's parameters (kernel, bias) plus an optional LoRA pair (lora_a, lora_b)."""

  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  use_bias: bool = True
  lora_rank: int = 0
  lora_alpha: float = 32.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    fan_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (fan_in, self.features))
    y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    if self.lora_rank:
      # A as torch's default Linear init (PEFT's choice), B zero: no change at step 0.
      a = self.param("lora_a", _symmetric_uniform(fan_in**-0.5), (fan_in, self.lora_rank))
      b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features))
      scale = self.lora_alpha / self.lora_rank
      y = y + jnp.dot(jnp.dot(x, a.astype(self.dtype)), b.astype(self.dtype)) * scale
    return y


def dense(
  features: int, name: str, tuning: Tuning, dtype: jnp.dtype, **kwargs: Callable | bool
) -> Dense:
  """A Dense layer named `name`, with LoRA when `tuning` targets that name."""
  return Dense(
    features,
    lora_rank=tuning.lora_rank_for(name),
    lora_alpha=tuning.lora_alpha,
    dtype=dtype,
    name=name,
    **kwargs,
  )


class Adapter(nn.Module):
  """LilT's bottleneck adapter x + up(gelu(down(x))); `up` starts at zero (identity)."""

  reduction: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.reduction:
      raise ValueError(f"width {width} is not divisible by adapter_reduction {self.reduction}")
    h = nn.Dense(
      width // self.reduction,
      dtype=self.dtype,
      kernel_init=nn.initializers.normal(1e-3),
      name="down",
    )(x)
    h = nn.gelu(h, approximate=False)
    return x + nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="up")(h)


def maybe_adapter(x: jax.Array, name: str, tuning: Tuning, dtype: jnp.dtype) -> jax.Array:
  if not tuning.adapter_reduction:
    return x
  return Adapter(tuning.adapter_reduction, dtype, name=name)(x)


def apply_dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout of `x` at `rate` inside `module`, where the caller of `apply` passed a
  "dropout" rng (training steps); the identity at rate 0 and without that rng (init,
  evaluation, prediction), so every eval path is deterministic without a flag."""
  if not rate or not module.has_rng("dropout"):
    return x
  return nn.Dropout(rate, deterministic=False)(x)


def attention_dropout_rng(module: nn.Module, rate: float) -> jax.Array | None:
  """The key for attention-probability dropout at `rate` in `module` (see `dropout`), or
  None where there is none to do."""
  if not rate or not module.has_rng("dropout"):
    return None
  return module.make_rng("dropout")


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (open_clip's in_proj)."""

  num_heads: int
  causal: bool = False
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  attention: str = "auto"  # config.model.attention: "auto", "xla" or "cudnn".
  dropout: float = 0.0  # After the output projection (timm's proj_drop).
  attention_dropout: float = 0.0  # On the attention probabilities (timm's attn_drop).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    x = sharding.constrain_batch(x)
    qkv = dense(
      3 * width,
      "in_proj",
      self.tuning,
      self.dtype,
      kernel_init=nn.initializers.normal(width**-0.5),
    )(x)
    # Batch-split from the projection on: the FSDP-split in_proj is gathered instead.
    qkv = sharding.constrain_batch(qkv, tensor_dim=2)
    q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, head_dim), 3, axis=2)
    out = dot_product_attention(
      q,
      k,
      v,
      self.attention,
      is_causal=self.causal,
      dropout_rate=self.attention_dropout,
      dropout_rng=attention_dropout_rng(self, self.attention_dropout),
    )
    out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
    out = dense(
      width, "out_proj", self.tuning, self.dtype, kernel_init=nn.initializers.normal(out_std)
    )(out.reshape(batch, length, width))
    return apply_dropout(self, out, self.dropout)


class Mlp(nn.Module):
  hidden_dim: int
  activation: str = "gelu"
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  dropout: float = 0.0  # After the activation and after c_proj (timm's Mlp drop).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = dense(
      self.hidden_dim,
      "c_fc",
      self.tuning,
      self.dtype,
      kernel_init=nn.initializers.normal((2 * width) ** -0.5),
    )(x)
    h = apply_dropout(self, ACTIVATIONS[self.activation](h), self.dropout)
    out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
    h = dense(
      width, "c_proj", self.tuning, self.dtype, kernel_init=nn.initializers.normal(out_std)
    )(h)
    return apply_dropout(self, h, self.dropout)


class ResidualBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x)).

  With adapters (LilT), each sub-layer's input first passes its adapter.
  """

  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = "gelu"
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  layer_norm_eps: float = LAYER_NORM_EPS  # timm's ViTs: 1e-6.
  attention: str = "auto"  # config.model.attention.
  dropout: float = 0.0  # timm's drop_rate: attention output and MLP (config.model.<tower>).
  attention_dropout: float = 0.0  # timm's attn_drop_rate: attention probabilities.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = maybe_adapter(x, "adapter_attn", self.tuning, self.dtype)
    x = x + Attention(
      self.num_heads,
      self.causal,
      self.out_init_std,
      self.dtype,
      self.tuning,
      attention=self.attention,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      name="attn",
    )(layer_norm("ln_1", self.dtype, self.layer_norm_eps)(x))
    x = maybe_adapter(x, "adapter_mlp", self.tuning, self.dtype)
    x = x + Mlp(
      self.mlp_dim,
      self.activation,
      self.out_init_std,
      self.dtype,
      self.tuning,
      dropout=self.dropout,
      name="mlp",
    )(layer_norm("ln_2", self.dtype, self.layer_norm_eps)(x))
    return x


class Transformer(nn.Module):
  """A stack of residual blocks with optional rematerialisation.

  Unrolled (the default, and the layout of weight import/export): blocks named
  resblocks_<i>. With `scan_layers`, one `nn.scan` over a single block whose parameters
  are stacked under "resblocks" (leading axis = depth): XLA compiles one block instead of
  `depth`, so compile time stops growing with depth. `stack_blocks` / `unstack_blocks`
  convert parameter trees between the two layouts.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = "gelu"
  remat: bool | str = "none"
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  layer_norm_eps: float = LAYER_NORM_EPS
  scan_layers: bool = False  # config.model.scan_layers
  attention: str = "auto"  # config.model.attention.
  dropout: float = 0.0  # ResidualBlock.dropout.
  attention_dropout: float = 0.0  # ResidualBlock.attention_dropout.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    # open_clip's residual-branch output scale: shrink with depth for stable early training.
    out_std = width**-0.5 * (2 * self.depth) ** -0.5
    block_args = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      causal=self.causal,
      activation=self.activation,
      out_init_std=out_std,
      dtype=self.dtype,
      tuning=self.tuning,
      layer_norm_eps=self.layer_norm_eps,
      attention=self.attention,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
    )
    if self.scan_layers:
      block = with_remat(ResidualBlock, self.remat, prevent_cse=False)(
        **block_args, name=STACKED_BLOCKS
      )
      scan = nn.scan(
        lambda module, carry, _: (module(carry), None),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # Each block its own masks.
        length=self.depth,
      )
      return scan(block, x, None)[0]
    block_cls = with_remat(ResidualBlock, self.remat)
    for i in range(self.depth):
      x = block_cls(**block_args, name=f"{STACKED_BLOCKS}_{i}")(x)
    return x
