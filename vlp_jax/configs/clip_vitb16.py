"""CLIP ViT-B/16 with a 12-layer 512-wide causal text transformer (the open_clip recipe).

  python train.py --config=configs/clip_vitb16.py --workdir=/path/run \
      --config.data.train=/data/cc12m --config.data.vocab_file=/data/vocab.txt
  python train.py --config=configs/clip_vitb16.py:variant=S/16 ...
  python train.py --config=configs/clip_vitb16.py:unmasked_tuning=True \
      --config.init_from=/path/masked_run ...   # tuning stage after masked pretraining

Meant for a TPU v5e-16 slice (v5e:4x4): the global batch of 2,048 is 128 per chip,
with scanned layers and full remat (launch with --config.model.scan_layers=True
--config.model.remat=full). Compiled for v5e:4x4 by
`python -m vlp_jax.preflight --config=configs/clip_vitb16.py --topology=v5e:4x4
--config.model.scan_layers=True --config.model.remat=full` (2026-12-07): fits, per chip
1.58 GiB arguments + 3.33 GiB temporaries of 15.75 GiB.
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs.common import base_config

# This recipe's args; flip_vitb16.py and cluster_vitb16.py take them too (masked_config).
ARGS = {"variant": "B/16", "batch_size": 2048, "epochs": 32.0, "unmasked_tuning": False}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, **ARGS)
  config = base_config()
  config.batch_size = args.batch_size
  config.num_epochs = args.epochs
  config.model.image.variant = args.variant
  config.model.embed_dim = 512
  config.optim.lr = 5e-4
  config.optim.warmup_steps = 2_000
  config.optim.weight_decay = 0.2
  if args.unmasked_tuning:
    # FLIP's last stage: no masking, a short run at a small lr, parameters from
    # config.init_from. 0.4 epoch and lr / 10 are our defaults, not FLIP's numbers.
    config.masking.kind = "none"
    config.num_epochs = min(args.epochs, 0.4)
    config.optim.lr /= 10
    config.optim.warmup_steps = 200
  return config_lib.lock(config)


def masked_config(args: ml_collections.ConfigDict, **masking: object) -> ml_collections.ConfigDict:
  """This recipe at `args` (ARGS' fields) with `masking` set on config.masking, unless
  args.unmasked_tuning (which masks nothing), and a mask picture every 5,000 steps: the
  masked recipes (flip_vitb16.py, cluster_vitb16.py)."""
  config = get_config(",".join(f"{key}={args[key]}" for key in ARGS))
  with config.unlocked():
    if not args.unmasked_tuning:
      for key, value in masking.items():
        config.masking[key] = value
    config.masking.show_every_steps = 5_000
  return config
