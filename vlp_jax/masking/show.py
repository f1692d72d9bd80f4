"""Pictures of masks: images with their masked patches shaded, one row per strategy
(the command line is `python -m vlp_jax.show_masks`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from vlp_jax import masking
from vlp_jax.masking.random import mask_from_keep

LABEL_WIDTH = 64


def shade_masked(image: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
  """Darkens and tints the masked patches of one uint8 image; mask is (L,) row-major."""
  grid = image.shape[0] // patch_size
  per_pixel = np.repeat(np.repeat(mask.reshape(grid, grid), patch_size, 0), patch_size, 1)
  shaded = image.astype(np.float32)
  shaded[per_pixel] = 0.35 * shaded[per_pixel] + 0.65 * np.array([215, 215, 235])
  return shaded.astype(np.uint8)


def draw_mask_grid(
  images: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str], patch_size: int
) -> np.ndarray:
  """Rows: one per (label, masks (N, L)); columns: the N images. Returns uint8 HxWx3."""
  rows = []
  height = images.shape[1]
  for label, mask in zip(labels, masks):
    tiles = [shade_masked(img, m, patch_size) for img, m in zip(images, np.asarray(mask))]
    tag = Image.new("RGB", (LABEL_WIDTH, height), (255, 255, 255))
    ImageDraw.Draw(tag).text((4, height // 2 - 6), label, fill=(0, 0, 0))
    rows.append(np.concatenate([np.asarray(tag), *tiles], axis=1))
  return np.concatenate(rows, axis=0)


def compute_masks(masker: masking.Masker, rng: jax.Array, images: np.ndarray) -> np.ndarray:
  """(N, L) bool masks of a masker on host images (True = dropped)."""
  keep, _ = jax.jit(masker.__call__)(rng, images)
  if keep is None:
    return np.zeros((len(images), masker.num_keep), bool)
  return np.asarray(mask_from_keep(keep, masker.num_patches))


def cluster_masks(masker: masking.Masker, rng: jax.Array, images: np.ndarray) -> np.ndarray:
  """The clusters' own masks before re-admission (what the paper draws)."""
  if isinstance(masker, masking.ClusterMasking):
    return np.asarray(jax.jit(masker.compute_mask)(rng, images)[0])
  return compute_masks(masker, rng, images)
