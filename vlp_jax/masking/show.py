r"""Pictures of masks: images with their masked patches shaded, one row per strategy.

  python -m vlp_jax.masking.show --config=configs/demo.py --out=masks.png
  python -m vlp_jax.masking.show --config=configs/cluster_vitb16.py --kinds=cluster,kmeans

Reads the first images of the config's training data (the built-in dataset when none
is given), center-cropped to the model's resolution.
"""

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


def main(argv: Sequence[str]) -> None:
  del argv
  import tempfile

  from vlp_jax import cli, trainer
  from vlp_jax.input_pipeline import pipeline

  cli.quiet_library_logs()
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as workdir:
    exp = trainer.create_experiment(config, workdir)
  visual = exp.model.visual
  dataset = pipeline.create_eval_dataset(
    list(exp.train_sets[0].shards), exp.tokenizer, image_size=visual.image_size, max_captions=1
  )
  images = []
  for index in range(len(dataset)):
    element = dataset[index]
    if element is not None:
      images.append(element["image"])
    if len(images) == _NUM_IMAGES.value:
      break
  images = np.stack(images)
  rng = jax.random.PRNGKey(_SEED.value)
  labels, masks = [], []
  for kind in _KINDS.value:
    settings = config.masking.copy_and_resolve_references()
    settings.kind = kind
    masker = masking.create_masker(
      settings,
      num_patches=visual.num_patches,
      patch_size=visual.size.patch_size,
      mean=visual.mean,
      std=visual.std,
    )
    labels.append(kind)
    masks.append(cluster_masks(masker, rng, images))
  grid = draw_mask_grid(images, masks, labels, visual.size.patch_size)
  scale = max(1, 128 // images.shape[1])
  picture = Image.fromarray(grid)
  picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(_OUT.value)
  print(f"wrote {_OUT.value}: rows {labels}, {len(images)} images")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).")
  _OUT = flags.DEFINE_string("out", "masks.png", "Output PNG.")
  _KINDS = flags.DEFINE_list("kinds", ["random", "cluster", "kmeans"], "Rows to draw.")
  _NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images per row.")
  _SEED = flags.DEFINE_integer("seed", 0, "Mask rng seed.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
