"""VLC's pretraining losses outside the model (methods/vlc.py wires them): MAE's
reconstruction loss on per-patch normalised pixels, the ITM pairs of a batch, and ViLT's
word-patch alignment distance by inexact optimal transport (IPOT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalized_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """MAE's norm_pix target: each patch (B, L, D) minus its mean, over sqrt(var + eps),
  with torch's unbiased variance (as MAE's `target.var(dim=-1)`)."""
  patches = patches.astype(jnp.float32)
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def mae_loss(
  predictions: jax.Array, patches: jax.Array, masked: jax.Array, norm_pix: bool = True
) -> jax.Array:
  """Mean over the `masked` (B, L) patches of the per-patch MSE between `predictions`
  and `patches` (B, L, D) (normalised per patch with `norm_pix`); 0 when none is masked."""
  target = normalized_patches(patches) if norm_pix else patches.astype(jnp.float32)
  per_patch = jnp.mean(jnp.square(predictions.astype(jnp.float32) - target), axis=-1)
  weights = masked.astype(jnp.float32)
  return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def itm_pairs(rng: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(ITM images, labels (B,) int32: 1 matched): exactly B // 2 random rows keep their
  image (VLC's split), the others get the image of the row half a batch away.

  Rows arrive in random order, so that row is a random other image; a fixed roll is one
  collective permute on a sharded batch, where a random gather would all-gather every
  image of the global batch.
  """
  batch = images.shape[0]
  labels = (jax.random.permutation(rng, batch) < batch // 2).astype(jnp.int32)
  negatives = jnp.roll(images, batch // 2, axis=0)
  keep = labels.reshape((batch,) + (1,) * (images.ndim - 1)).astype(bool)
  return jnp.where(keep, images, negatives), labels


def optimal_transport_distance(
  text: jax.Array,
  image: jax.Array,
  text_valid: jax.Array,
  image_valid: jax.Array,
  beta: float = 0.5,
  iterations: int = 50,
  inner_steps: int = 1,
) -> jax.Array:
  """ViLT's word-patch alignment distance per row (B,): sum_ij C_ij T_ij, with C the
  cosine distance between text (B, M, W) and image (B, N, W) states and T the transport
  plan of the inexact proximal point method (IPOT, Xie et al. 2019) between uniform
  weights over the valid tokens. T is computed without gradients, as ViLT does."""
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-5)  # noqa: E731
  text, image = unit(text.astype(jnp.float32)), unit(image.astype(jnp.float32))
  joint = text_valid[:, :, None] & image_valid[:, None, :]
  cost = jnp.where(joint, 1.0 - jnp.einsum("bmd,bnd->bmn", text, image), 0.0)
  plan = _ipot(jax.lax.stop_gradient(cost), text_valid, image_valid, beta, iterations, inner_steps)
  return jnp.sum(cost * jax.lax.stop_gradient(plan), axis=(1, 2))


def _ipot(
  cost: jax.Array,
  text_valid: jax.Array,
  image_valid: jax.Array,
  beta: float,
  iterations: int,
  inner_steps: int,
) -> jax.Array:
  """The transport plan (B, M, N): marginals 1/m over valid text rows, 1/n over valid
  image columns; zero at invalid ones."""
  joint = (text_valid[:, :, None] & image_valid[:, None, :]).astype(cost.dtype)
  m = jnp.maximum(jnp.sum(text_valid, axis=1, keepdims=True), 1).astype(cost.dtype)
  n = jnp.maximum(jnp.sum(image_valid, axis=1, keepdims=True), 1).astype(cost.dtype)
  kernel = jnp.exp(-cost / beta) * joint

  def scaled(valid: jax.Array, count: jax.Array, mass: jax.Array) -> jax.Array:
    # 1 / (count * mass) at valid positions, 0 elsewhere (no division by zero).
    return jnp.where(valid, 1.0 / (count * jnp.where(valid, mass, 1.0)), 0.0)

  def outer(_, carry):
    plan, sigma = carry
    q = kernel * plan

    def inner(_, scalings):
      sigma, _ = scalings
      delta = scaled(image_valid, n, jnp.einsum("bmn,bm->bn", q, sigma))
      return scaled(text_valid, m, jnp.einsum("bmn,bn->bm", q, delta)), delta

    sigma, delta = jax.lax.fori_loop(0, inner_steps, inner, (sigma, jnp.zeros_like(q[:, 0])))
    return sigma[:, :, None] * q * delta[:, None, :], sigma

  sigma = jnp.where(text_valid, 1.0 / m, 0.0)
  plan, _ = jax.lax.fori_loop(0, iterations, outer, (joint, sigma))
  return plan * joint
