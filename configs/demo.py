"""A small CLIP on the built-in dataset: minutes on a laptop CPU.

python train.py --config=configs/demo.py --workdir=/tmp/demo
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config
from vlp_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, steps=600, batch_size=64, masking="none")
  config = base_config()
  config.batch_size = args.batch_size
  config.total_steps = args.steps

  config.model.embed_dim = 128
  config.model.image.variant = "mu/8"  # width 128, depth 4, 4 heads; 8x8 patches.
  config.model.image.image_size = 64
  config.model.text.context_length = 24  # The longest built-in caption has 22 tokens.
  config.model.text.width = 128
  config.model.text.depth = 4
  config.model.text.num_heads = 4
  config.model.text.mlp_dim = 512

  config.masking.kind = args.masking  # none | random | cluster | kmeans
  config.masking.anchor_ratio = 0.05  # 3 anchors of 64 patches
  config.masking.num_clusters = 6

  config.data.crop_scale = (0.8, 1.0)  # Mild crops keep every shape in view.
  config.data.flip = False  # A flip would turn "left of" into "right of".
  config.data.num_workers = 1

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.1

  config.eval.every_steps = 200
  config.eval.batch_size = 200
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200
  return config_lib.lock(config)
