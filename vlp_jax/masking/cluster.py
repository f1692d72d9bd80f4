"""Cluster masking ("Masking Clusters in Vision-language Pretraining", CVPR 2024).

Patches are compared by their raw pixels, normalised per patch (MAE's norm_pix), with
cosine similarity. Two ways to form clusters, both jitted and vectorised over the batch:
- anchors (the paper): random anchor patches; a patch is masked when its similarity to
  any anchor exceeds a threshold, calibrated inside jit so that the batch-mean mask
  ratio hits the target;
- k-means: a fixed number of spherical Lloyd iterations per image; whole clusters are
  masked in random order up to the target ratio.
Every image then masks at least `min_ratio` (random extra patches where clusters covered
less). Returns boolean masks (B, L), True = masked; `select_keep` turns them into a
static number of kept tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vlp_jax.models.vit import normalize_pixels, patchify

NORM_PIX_EPS = 1e-6


def patch_features(
  images: jax.Array, patch_size: int, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """(B, H, W, 3) pixels -> (B, L, p*p*3) per-patch-normalised, unit-length features."""
  patches = patchify(normalize_pixels(images, mean, std, jnp.float32), patch_size)
  centred = patches - patches.mean(axis=-1, keepdims=True)
  normed = centred / jnp.sqrt(patches.var(axis=-1, keepdims=True) + NORM_PIX_EPS)
  return normed / jnp.maximum(jnp.linalg.norm(normed, axis=-1, keepdims=True), 1e-12)


def enforce_min_count(rng: jax.Array, mask: jax.Array, min_count: int) -> jax.Array:
  """Adds random unmasked patches to rows with fewer than `min_count` masked ones."""
  score = mask.astype(jnp.float32) + jax.random.uniform(rng, mask.shape)  # masked first
  ranks = jnp.argsort(jnp.argsort(-score, axis=-1), axis=-1)
  wanted = jnp.maximum(mask.sum(axis=-1, keepdims=True), min_count)
  return ranks < wanted


def calibrate_threshold(
  max_similarity: jax.Array, anchors: jax.Array, target: float, min_count: int, steps: int
) -> jax.Array:
  """Bisection for the threshold whose batch-mean mask ratio (after the minimum) is `target`."""
  length = max_similarity.shape[-1]

  def mean_ratio(threshold):
    counts = ((max_similarity > threshold) | anchors).sum(axis=-1)
    return jnp.maximum(counts, min_count).mean() / length

  def bisect(_, bounds):
    low, high = bounds  # mean_ratio(low) >= target >= mean_ratio(high)
    mid = (low + high) / 2
    above = mean_ratio(mid) > target
    return jnp.where(above, mid, low), jnp.where(above, high, mid)

  low, high = jax.lax.fori_loop(0, steps, bisect, (jnp.float32(-1.0001), jnp.float32(1.0)))
  # Pick whichever end lands closer to the target.
  closer_low = jnp.abs(mean_ratio(low) - target) < jnp.abs(mean_ratio(high) - target)
  return jnp.where(closer_low, low, high)


def anchor_cluster_mask(
  rng: jax.Array,
  features: jax.Array,
  *,
  num_anchors: int,
  target_ratio: float,
  min_ratio: float,
  calibration_steps: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The paper's one-hop clustering around random anchors; threshold calibrated per batch."""
  batch, length, _ = features.shape
  anchor_rng, min_rng = jax.random.split(rng)
  anchor_index = jnp.argsort(jax.random.uniform(anchor_rng, (batch, length)), axis=-1)
  anchor_index = anchor_index[:, :num_anchors]
  anchors = jnp.zeros((batch, length), bool).at[jnp.arange(batch)[:, None], anchor_index].set(True)
  anchor_features = jnp.take_along_axis(features, anchor_index[..., None], axis=1)
  # One hop: each patch's highest cosine similarity to any anchor of its image.
  max_similarity = jnp.einsum("bld,bad->bla", features, anchor_features).max(axis=-1)
  min_count = round(min_ratio * length)
  threshold = calibrate_threshold(
    max_similarity, anchors, target_ratio, min_count, calibration_steps
  )
  mask = (max_similarity > threshold) | anchors
  mask = enforce_min_count(min_rng, mask, min_count)
  return mask, {"threshold": threshold, "num_clusters": jnp.float32(num_anchors)}


def kmeans_plus_plus_init(rng: jax.Array, features: jax.Array, num_clusters: int) -> jax.Array:
  """k-means++ seeding on unit vectors: each new centre is drawn with probability
  proportional to its squared distance to the nearest centre chosen so far."""
  length = features.shape[0]
  first_rng, rest_rng = jax.random.split(rng)
  first = jax.random.randint(first_rng, (), 0, length)
  centres = jnp.zeros((num_clusters, features.shape[1]), features.dtype).at[0].set(features[first])
  nearest = 2.0 - 2.0 * (features @ features[first])  # squared distance of unit vectors

  def add_centre(i, carry):
    centres, nearest = carry
    logits = jnp.log(jnp.maximum(nearest, 0.0) + 1e-12)
    pick = jax.random.categorical(jax.random.fold_in(rest_rng, i), logits)
    centres = centres.at[i].set(features[pick])
    return centres, jnp.minimum(nearest, 2.0 - 2.0 * (features @ features[pick]))

  centres, _ = jax.lax.fori_loop(1, num_clusters, add_centre, (centres, nearest))
  return centres


def spherical_kmeans(
  rng: jax.Array, features: jax.Array, num_clusters: int, iterations: int
) -> jax.Array:
  """Cluster id (L,) of each unit-length feature of one image (k-means++ seeding)."""
  centroids = kmeans_plus_plus_init(rng, features, num_clusters)

  def lloyd(_, centroids):
    assignment = jnp.argmax(features @ centroids.T, axis=-1)
    one_hot = jax.nn.one_hot(assignment, num_clusters, dtype=features.dtype)
    sums = one_hot.T @ features
    norms = jnp.linalg.norm(sums, axis=-1, keepdims=True)
    # An emptied cluster keeps its old centroid.
    return jnp.where(norms > 0, sums / jnp.maximum(norms, 1e-12), centroids)

  centroids = jax.lax.fori_loop(0, iterations, lloyd, centroids)
  return jnp.argmax(features @ centroids.T, axis=-1)


def kmeans_cluster_mask(
  rng: jax.Array,
  features: jax.Array,
  *,
  num_clusters: int,
  iterations: int,
  target_ratio: float,
  min_ratio: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masks whole k-means clusters, in random order, until about `target_ratio` is covered."""
  batch, length, _ = features.shape
  init_rng, order_rng, min_rng = jax.random.split(rng, 3)
  assignment = jax.vmap(spherical_kmeans, in_axes=(0, 0, None, None))(
    jax.random.split(init_rng, batch), features, num_clusters, iterations
  )
  sizes = jax.nn.one_hot(assignment, num_clusters, dtype=jnp.float32).sum(axis=1)  # (B, K)
  order = jnp.argsort(jax.random.uniform(order_rng, sizes.shape), axis=-1)
  ordered = jnp.take_along_axis(sizes, order, axis=-1)
  before = jnp.cumsum(ordered, axis=-1) - ordered
  # A cluster is taken while the covered share, counting half of it, stays under the
  # target: a prefix of the random order, with no bias above or below the target.
  take_ordered = (before + ordered / 2 <= target_ratio * length) & (ordered > 0)
  take = jnp.zeros_like(take_ordered).at[jnp.arange(batch)[:, None], order].set(take_ordered)
  mask = jnp.take_along_axis(take, assignment, axis=-1)
  mask = enforce_min_count(min_rng, mask, round(min_ratio * length))
  return mask, {"num_clusters": take.sum(axis=-1).astype(jnp.float32).mean()}
