"""Patch masking strategies behind one interface.

A masker is called as `masker(rng, images) -> (keep_indices, stats)` inside the jitted
train step: `images` are the raw pixels (B, H, W, 3), `keep_indices` (B, num_keep)
int32 go to the image tower (None: keep everything), `stats` are scalar metrics. The
number of kept tokens is static per config, so nothing recompiles from step to step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from vlp_jax.masking import cluster
from vlp_jax.masking.random import mask_from_keep, random_keep, select_keep

KINDS = ("none", "random", "cluster", "kmeans")
# How many tokens the image tower gets under cluster masking: "reference" is the released
# code's floor(L * (1 - min_ratio)), "target" drops exactly round(L * ratio) patches.
KEEP_RULES = ("reference", "target")
MaskStats = dict[str, jax.Array]


def dropped_stats(keep: jax.Array, num_patches: int) -> MaskStats:
  """The share of patches the image tower does not see (static, so one number)."""
  return {"dropped_share": jnp.float32(1 - keep.shape[-1] / num_patches)}


def coverage_stats(mask: jax.Array, keep: jax.Array) -> MaskStats:
  """What the clusters covered, and how much of it the tower saw anyway (re-admitted)."""
  coverage = mask.mean(axis=-1)
  readmitted = jnp.take_along_axis(mask, keep, axis=-1).sum(axis=-1) / mask.shape[-1]
  return {
    "cluster_coverage_mean": coverage.mean(),
    "cluster_coverage_min": coverage.min(),
    "cluster_coverage_max": coverage.max(),
    "readmitted_share": readmitted.mean(),
  }


@dataclasses.dataclass(frozen=True)
class NoMasking:
  num_patches: int

  @property
  def num_keep(self) -> int:
    return self.num_patches

  def __call__(self, rng: jax.Array, images: jax.Array) -> tuple[jax.Array | None, MaskStats]:
    return None, {}


@dataclasses.dataclass(frozen=True)
class RandomMasking:
  """FLIP: drop a uniformly random `ratio` of the patches of every image."""

  num_patches: int
  ratio: float

  @property
  def num_keep(self) -> int:
    return int(self.num_patches * (1 - self.ratio))

  def __call__(self, rng: jax.Array, images: jax.Array) -> tuple[jax.Array, MaskStats]:
    keep = random_keep(rng, images.shape[0], self.num_patches, self.num_keep)
    return keep, dropped_stats(keep, self.num_patches)


@dataclasses.dataclass(frozen=True)
class ClusterMasking:
  """Masks clusters of similar patches (anchors + threshold, or k-means).

  The clusters cover about `target_ratio` of the batch's patches (at least `min_ratio`
  of every image); the image tower then gets a static number of tokens, visible patches
  first in random order:
  - keep="reference" (the released code): floor(L * (1 - min_ratio)) tokens; where the
    clusters covered more than `min_ratio`, random masked patches are re-admitted.
  - keep="target": round(L * (1 - target_ratio)) tokens, so the tower drops exactly the
    target share: extra visible patches dropped at random where the clusters covered
    less, masked ones re-admitted where they covered more.
  Logged: `cluster_coverage_*` (the clusters' masks), `dropped_share` (what the tower did
  not see) and `readmitted_share` (covered, yet seen).
  """

  num_patches: int
  patch_size: int
  mean: Sequence[float]
  std: Sequence[float]
  method: str  # "anchors" or "kmeans"
  target_ratio: float
  min_ratio: float
  anchor_ratio: float
  calibration_steps: int
  num_clusters: int
  kmeans_iterations: int
  keep_rule: str = "reference"

  @property
  def num_keep(self) -> int:
    if self.keep_rule == "target":
      return max(1, round(self.num_patches * (1 - self.target_ratio)))
    return math.floor(self.num_patches * (1 - self.min_ratio))

  def compute_mask(self, rng: jax.Array, images: jax.Array) -> tuple[jax.Array, MaskStats]:
    features = cluster.patch_features(images, self.patch_size, self.mean, self.std)
    if self.method == "anchors":
      return cluster.anchor_cluster_mask(
        rng,
        features,
        num_anchors=max(1, round(self.anchor_ratio * self.num_patches)),
        target_ratio=self.target_ratio,
        min_ratio=self.min_ratio,
        calibration_steps=self.calibration_steps,
      )
    return cluster.kmeans_cluster_mask(
      rng,
      features,
      num_clusters=self.num_clusters,
      iterations=self.kmeans_iterations,
      target_ratio=self.target_ratio,
      min_ratio=self.min_ratio,
    )

  def __call__(self, rng: jax.Array, images: jax.Array) -> tuple[jax.Array, MaskStats]:
    mask_rng, keep_rng = jax.random.split(rng)
    mask, stats = self.compute_mask(mask_rng, images)
    keep = select_keep(keep_rng, mask.astype(jnp.float32), self.num_keep)
    stats = {**coverage_stats(mask, keep), **dropped_stats(keep, self.num_patches), **stats}
    return keep, stats


Masker = NoMasking | RandomMasking | ClusterMasking


def validate(masking: ml_collections.ConfigDict, num_patches: int) -> None:
  """Raises ValueError naming the config key when the masking settings cannot work."""
  if masking.kind not in KINDS:
    raise ValueError(f"config.masking.kind={masking.kind!r} is not one of {KINDS}")
  if not 0.0 <= masking.ratio < 1.0:
    raise ValueError(f"config.masking.ratio={masking.ratio} must be in [0, 1)")
  if masking.kind in ("cluster", "kmeans"):
    if masking.keep not in KEEP_RULES:
      raise ValueError(f"config.masking.keep={masking.keep!r} is not one of {KEEP_RULES}")
    if not 0.0 <= masking.min_ratio <= masking.ratio:
      raise ValueError(
        f"config.masking.min_ratio={masking.min_ratio} must be in [0, masking.ratio={masking.ratio}]"
      )
    if masking.kind == "cluster" and not 0.0 < masking.anchor_ratio <= masking.ratio:
      raise ValueError(f"config.masking.anchor_ratio={masking.anchor_ratio} must be in (0, ratio]")
    if masking.kind == "kmeans" and not 2 <= masking.num_clusters <= num_patches:
      raise ValueError(
        f"config.masking.num_clusters={masking.num_clusters} must be in [2, {num_patches}] patches"
      )
  if masking.kind != "none" and (num_patches * (1 - masking.ratio)) < 1:
    raise ValueError(f"config.masking.ratio={masking.ratio} keeps no patch of {num_patches}")


def create_masker(
  masking: ml_collections.ConfigDict,
  *,
  num_patches: int,
  patch_size: int,
  mean: Sequence[float],
  std: Sequence[float],
) -> Masker:
  validate(masking, num_patches)
  if masking.kind == "none" or (masking.kind == "random" and masking.ratio == 0):
    return NoMasking(num_patches)
  if masking.kind == "random":
    return RandomMasking(num_patches, masking.ratio)
  return ClusterMasking(
    num_patches=num_patches,
    patch_size=patch_size,
    mean=tuple(mean),
    std=tuple(std),
    method="anchors" if masking.kind == "cluster" else "kmeans",
    target_ratio=masking.ratio,
    min_ratio=masking.min_ratio,
    anchor_ratio=masking.anchor_ratio,
    calibration_steps=masking.calibration_steps,
    num_clusters=masking.num_clusters,
    kmeans_iterations=masking.kmeans_iterations,
    keep_rule=masking.keep,
  )


__all__ = [
  "KEEP_RULES",
  "KINDS",
  "ClusterMasking",
  "Masker",
  "NoMasking",
  "RandomMasking",
  "create_masker",
  "mask_from_keep",
  "select_keep",
]
