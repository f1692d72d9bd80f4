"""A plain Flax CLIP, the third column of train_step.py: what a user writes in an afternoon
from flax.linen's own layers, to show what vlp_jax's model code adds or costs.

Same shapes and recipe as vlp_jax's and open_clip's step: pre-LN blocks, exact GELU,
causal text attention pooled at the highest token id (CLIP's EOT), learnable
temperature, symmetric InfoNCE, global-norm clipping, AdamW with decay on matrices only.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# variant -> (patch, vision width, depth, heads, text width, depth, heads, embed dim)
SIZES = {
  "B/16": (16, 768, 12, 12, 512, 12, 8, 512),
  "B/32": (32, 768, 12, 12, 512, 12, 8, 512),
  "L/14": (14, 1024, 24, 16, 768, 12, 12, 768),
}


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x), mask=mask)
    hidden = nn.gelu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x)), approximate=False)
    return x + nn.Dense(x.shape[-1])(hidden)


class Tower(nn.Module):
  width: int
  depth: int
  heads: int
  embed_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, pool: jax.Array) -> jax.Array:
    x = x + self.param("pos", nn.initializers.normal(0.01), x.shape[1:])
    for _ in range(self.depth):
      x = Block(self.heads)(x, mask)
    pooled = nn.LayerNorm()(x[jnp.arange(x.shape[0]), pool])
    return nn.Dense(self.embed_dim, use_bias=False)(pooled)


class PlainClip(nn.Module):
  variant: str
  vocab_size: int

  @nn.compact
  def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    patch, v_width, v_depth, v_heads, t_width, t_depth, t_heads, embed = SIZES[self.variant]
    x = nn.Conv(v_width, (patch, patch), (patch, patch), use_bias=False)(images)
    x = x.reshape(x.shape[0], -1, v_width)
    cls = jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (v_width,)), x[:, :1].shape)
    x = nn.LayerNorm()(jnp.concatenate([cls, x], axis=1))  # CLIP's ln_pre.
    image = Tower(v_width, v_depth, v_heads, embed)(x, None, jnp.zeros(x.shape[0], jnp.int32))
    t = nn.Embed(self.vocab_size, t_width)(tokens)
    causal = nn.make_causal_mask(tokens)
    text = Tower(t_width, t_depth, t_heads, embed)(t, causal, jnp.argmax(tokens, axis=-1))
    image, text = (f / jnp.linalg.norm(f, axis=-1, keepdims=True) for f in (image, text))
    scale = jnp.exp(self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ()))
    logits = scale * image @ text.T
    labels = jnp.arange(logits.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(logits, labels).mean() + ce(logits.T, labels).mean()) / 2


def train_step(
  variant: str, vocab_size: int, images: jax.Array, tokens: jax.Array
) -> tuple[Callable[[], None], int]:
  """(a callable that runs one jitted train step of `PlainClip` on the given batch,
  carrying its parameters and optimizer state; the parameter count)."""
  model = PlainClip(variant, vocab_size)
  params = model.init(jax.random.key(0), images, tokens)
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, mask=decay_mask),
  )

  @jax.jit
  def step(params, opt_state, images, tokens):
    loss, grads = jax.value_and_grad(model.apply)(params, images, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  holder = {"params": params, "opt_state": tx.init(params)}

  def run() -> None:
    holder["params"], holder["opt_state"], loss = step(
      holder["params"], holder["opt_state"], images, tokens
    )
    jax.block_until_ready(loss)

  return run, sum(x.size for x in jax.tree.leaves(params))
