r"""Pictures of masks: images with their masked patches shaded, one row per strategy.

  python -m vlp_jax.show_masks --config=configs/demo.py --out=masks.png
  python -m vlp_jax.show_masks --config=configs/cluster_vitb16.py --kinds=cluster,kmeans

Reads the first images of the config's training data (the built-in dataset when none
is given), center-cropped to the model's resolution.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from vlp_jax import cli, experiment, masking
from vlp_jax.input_pipeline import pipeline
from vlp_jax.masking import show


def main(argv: Sequence[str]) -> None:
  del argv
  cli.quiet_library_logs()
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as workdir:
    exp = experiment.create_experiment(config, workdir)
  visual = exp.method.model.visual
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
    masks.append(show.cluster_masks(masker, rng, images))
  grid = show.draw_mask_grid(images, masks, labels, visual.size.patch_size)
  scale = max(1, 128 // images.shape[1])
  picture = Image.fromarray(grid)
  picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(_OUT.value)
  print(f"wrote {_OUT.value}: rows {labels}, {len(images)} images")


if __name__ == "__main__":
  from absl import app, flags

  _CONFIG = cli.define_config_flag()
  flags.declare_key_flag("config")  # Defined in vlp_jax.cli; --helpshort lists it here.
  _OUT = flags.DEFINE_string("out", "masks.png", "Output PNG.")
  _KINDS = flags.DEFINE_list("kinds", ["random", "cluster", "kmeans"], "Rows to draw.")
  _NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images per row.")
  _SEED = flags.DEFINE_integer("seed", 0, "Mask rng seed.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
