"""Cluster masking CLIP ViT-B/16 (CVPR 2024), the paper's CC12M recipe as defaults.

  python train.py --config=configs/cluster_vitb16.py --workdir=/runs/cluster \
      --config.data.train=/data/cc12m --config.data.eval=/data/coco_val \
      --config.data.vocab_file=/data/vocab.txt
  python train.py --config=configs/cluster_vitb16.py:kind=kmeans ...   # k-means clusters

Without config.data.train it runs on the built-in dataset (and says so).
"""

from __future__ import annotations

import ml_collections

from configs import clip_vitb16
from vlp_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg, variant="B/16", batch_size=2048, epochs=32.0, kind="cluster", unmasked_tuning=False
  )
  config = clip_vitb16.get_config(
    f"variant={args.variant},batch_size={args.batch_size},epochs={args.epochs},"
    f"unmasked_tuning={args.unmasked_tuning}"
  )
  with config.unlocked():
    if not args.unmasked_tuning:
      config.masking.kind = args.kind  # "cluster" (anchors + threshold) or "kmeans"
      config.masking.ratio = 0.5  # target batch-mean mask ratio
      config.masking.min_ratio = 0.3  # every image masks at least this
      config.masking.anchor_ratio = 0.03  # 6 anchors of 196 patches
    config.masking.show_every_steps = 5_000
  return config
