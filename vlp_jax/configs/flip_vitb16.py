"""FLIP: CLIP ViT-B/16 with 50% random patch masking (the cluster-masking baseline).

  python train.py --config=configs/flip_vitb16.py --workdir=/runs/flip ...
  python train.py --config=configs/flip_vitb16.py:ratio=0.75 ...
  # Unmasked tuning after pretraining (mask ratio 0, small lr, from a checkpoint):
  python train.py --config=configs/flip_vitb16.py:unmasked_tuning=True \
      --config.init_from=/runs/flip --workdir=/runs/flip_tuned ...

Meant for a TPU v5e-16 slice (v5e:4x4: the global 2,048 is 128 per chip), with
--config.model.scan_layers=True --config.model.remat=full at launch. `python -m
vlp_jax.preflight --config=configs/flip_vitb16.py --topology=v5e:4x4` with those two
overrides (2026-12-07): fits, peak 2.85 GiB per chip of 15.75.
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import clip_vitb16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, **clip_vitb16.ARGS, ratio=0.5)
  return clip_vitb16.masked_config(args, kind="random", ratio=args.ratio)
