"""The smallest useful config, for tests: a 1-block ViT and text tower on 32 px images."""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, cache_dir="", steps=4, batch_size=16)
  config = demo.get_config(f"steps={args.steps},batch_size={args.batch_size}")
  config.unlock()
  config.model.embed_dim = 32
  config.model.image.image_size = 32
  config.model.image.width = 32
  config.model.image.depth = 1
  config.model.image.num_heads = 2
  config.model.image.mlp_dim = 64
  config.model.text.width = 32
  config.model.text.depth = 1
  config.model.text.num_heads = 2
  config.model.text.mlp_dim = 64
  config.data.cache_dir = args.cache_dir
  config.data.num_workers = 0
  config.data.read_threads = 2
  config.data.builtin.num_train = 256
  config.data.builtin.num_heldout = 64
  config.data.builtin.image_size = 32
  config.eval.batch_size = 32
  config.eval.every_steps = 0
  config.optim.warmup_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  return config_lib.lock(config)
