"""Cluster masking CLIP ViT-B/16 (CVPR 2024), the paper's CC12M recipe as defaults.

  python train.py --config=configs/cluster_vitb16.py --workdir=/runs/cluster \
      --config.data.train=/data/cc12m --config.data.eval=/data/coco_val \
      --config.data.vocab_file=/data/vocab.txt
  python train.py --config=configs/cluster_vitb16.py:kind=kmeans ...   # k-means clusters
  python train.py --config=configs/cluster_vitb16.py:keep=target ...   # drop exactly 50%

"ratio 0.5" is the clusters' coverage (logged as mask/cluster_coverage_mean). With the
released code's keep rule (keep=reference, the default) the image tower still gets
floor(196 x 0.7) = 137 of 196 tokens, masked patches re-admitted to fill: it drops 30%
(mask/dropped_share), 40% more image-tower FLOPs than FLIP at 0.5 (98 tokens).
keep=target gives the tower round(196 x 0.5) = 98 tokens, the FLIP budget.

Without config.data.train it runs on the built-in dataset (and says so).

Meant for a TPU v5e-16 slice (v5e:4x4: the global 2,048 is 128 per chip), with
--config.model.scan_layers=True --config.model.remat=full at launch. `python -m
vlp_jax.preflight --config=configs/cluster_vitb16.py --topology=v5e:4x4` with those two
overrides (2026-12-07): fits, peak 3.32 GiB per chip of 15.75.
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import clip_vitb16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, **clip_vitb16.ARGS, kind="cluster", keep="reference")
  return clip_vitb16.masked_config(
    args,
    kind=args.kind,  # "cluster" (anchors + threshold) or "kmeans"
    ratio=0.5,  # target batch-mean mask ratio
    min_ratio=0.3,  # every image masks at least this
    keep=args.keep,  # "reference" (137 tokens) or "target" (98)
    anchor_ratio=0.03,  # 6 anchors of 196 patches
  )
