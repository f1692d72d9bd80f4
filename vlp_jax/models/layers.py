"""Transformer building blocks shared by the image and text towers.

Parameter names follow open_clip's state dict (ln_1, attn.in_proj, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj, resblocks_<i>) so checkpoints map one to one.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.LayerNorm's default; flax's is 1e-6. Needed for parity with open_clip.
LAYER_NORM_EPS = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "quick_gelu": quick_gelu,
}


def layer_norm(name: str, dtype: jnp.dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (open_clip's in_proj)."""

  num_heads: int
  causal: bool = False
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    qkv = nn.Dense(
      3 * width,
      dtype=self.dtype,
      kernel_init=nn.initializers.normal(width**-0.5),
      name="in_proj",
    )(x)
    q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, head_dim), 3, axis=2)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
    return nn.Dense(
      width,
      dtype=self.dtype,
      kernel_init=nn.initializers.normal(out_std),
      name="out_proj",
    )(out.reshape(batch, length, width))


class Mlp(nn.Module):
  hidden_dim: int
  activation: str = "gelu"
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(
      self.hidden_dim,
      dtype=self.dtype,
      kernel_init=nn.initializers.normal((2 * width) ** -0.5),
      name="c_fc",
    )(x)
    h = ACTIVATIONS[self.activation](h)
    out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
    return nn.Dense(
      width, dtype=self.dtype, kernel_init=nn.initializers.normal(out_std), name="c_proj"
    )(h)


class ResidualBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = "gelu"
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + Attention(self.num_heads, self.causal, self.out_init_std, self.dtype, name="attn")(
      layer_norm("ln_1", self.dtype)(x)
    )
    x = x + Mlp(self.mlp_dim, self.activation, self.out_init_std, self.dtype, name="mlp")(
      layer_norm("ln_2", self.dtype)(x)
    )
    return x


# Activation rematerialisation policies (config.model.remat): what the backward pass keeps.
REMAT_POLICIES = {
  "none": None,  # Keep every activation: fastest, most memory.
  "full": jax.checkpoint_policies.nothing_saveable,  # Recompute each block: least memory.
  # Keep matmul outputs, recompute the cheap elementwise ops (softmax, gelu, layer norm).
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy_name(remat: bool | str) -> str:
  """Normalises `config.model.remat` (a policy name; True/False mean "full"/"none")."""
  name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={remat!r} is not one of {tuple(REMAT_POLICIES)}")
  return name


class Transformer(nn.Module):
  """A stack of residual blocks named resblocks_<i>, with optional rematerialisation."""

  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = "gelu"
  remat: bool | str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    # open_clip's residual-branch output scale: shrink with depth for stable early training.
    out_std = width**-0.5 * (2 * self.depth) ** -0.5
    policy = remat_policy_name(self.remat)
    block_cls = ResidualBlock
    if policy != "none":
      block_cls = nn.remat(ResidualBlock, policy=REMAT_POLICIES[policy])
    for i in range(self.depth):
      x = block_cls(
        self.num_heads,
        self.mlp_dim,
        self.causal,
        self.activation,
        out_std,
        self.dtype,
        name=f"resblocks_{i}",
      )(x)
    return x
