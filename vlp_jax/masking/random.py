"""Token selection shared by every masking strategy, and FLIP's random masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def select_keep(rng: jax.Array, bias: jax.Array, num_keep: int) -> jax.Array:
  """Indices (B, num_keep) of the tokens to keep, FLIP's interface: small bias is kept.

  `bias` (B, L) in [0, 1]: 0 for visible tokens, 1 for masked ones. Uniform noise breaks
  ties, so visible tokens come first in random order and, when fewer than `num_keep`
  are visible, random masked tokens are re-admitted to fill the static count.
  """
  noise = jax.random.uniform(rng, bias.shape)
  order = jnp.argsort(bias.astype(jnp.float32) + noise, axis=-1)
  return order[:, :num_keep].astype(jnp.int32)


def random_keep(rng: jax.Array, batch: int, num_patches: int, num_keep: int) -> jax.Array:
  """FLIP: a uniformly random subset of `num_keep` patches per image."""
  return select_keep(rng, jnp.zeros((batch, num_patches)), num_keep)


def mask_from_keep(keep_indices: jax.Array, num_patches: int) -> jax.Array:
  """(B, K) kept indices -> (B, L) bool, True where the patch was dropped."""
  kept = jnp.zeros((keep_indices.shape[0], num_patches), bool)
  kept = kept.at[jnp.arange(keep_indices.shape[0])[:, None], keep_indices].set(True)
  return ~kept
