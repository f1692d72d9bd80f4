"""LiT: a pretrained ViT-B/16 (open_clip's visual tower), locked, aligned to a pretrained
BERT-base that trains; CLS -> Linear(256), temperature 0.07 (the LilT paper's setup).

  python train.py --config=configs/lit_b16_bert.py --workdir=/path/run \
      --config.model.image.init=open_clip:/ckpt/ViT-B-16/open_clip_model.safetensors \
      --config.model.text.init=hf_bert:/ckpt/bert-base-uncased \
      --config.data.train=/data/coco --config.data.eval=/data/coco_val

The tower paths default to pretrained/ under the working directory; a missing one fails
before any compute, naming its key. The WordPiece vocab defaults to the text
checkpoint's vocab.txt. Any tower format of `python -m vlp_jax.weights.convert` works
("timm:/ckpt/mae_vit_base.pth" for an MAE encoder, with its model.image options).

Meant for a TPU v5e-8 slice (v5e:2x4: the batch of 1,024 is 128 per chip), with
--config.model.remat=full at launch (BERT has no scanned layout). `python -m
vlp_jax.preflight --config=configs/lit_b16_bert.py --topology=v5e:2x4` with that override
(2026-12-08): fits, peak 2.41 GiB per chip of 15.75
(benchmarks/results/preflight_lit_b16_bert_v5e_2x4.json).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs.common import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, preset="lit", batch_size=1024, epochs=15.0)
  config = base_config()
  config.batch_size = args.batch_size
  config.num_epochs = args.epochs
  config.peft.preset = args.preset  # lit: image tower locked; lilt: adapters + norms.

  config.model.embed_dim = 256
  config.model.image.variant = "B/16"
  config.model.image.init = "open_clip:pretrained/ViT-B-16/open_clip_model.safetensors"
  config.model.text.kind = "bert"
  config.model.text.pooling = "cls"
  config.model.text.context_length = 32
  config.model.text.max_positions = 512
  config.model.text.width = 768
  config.model.text.depth = 12
  config.model.text.num_heads = 12
  config.model.text.mlp_dim = 3072
  config.model.text.init = "hf_bert:pretrained/bert-base-uncased"
  config.data.tokenizer = "wordpiece"
  config.data.lower_case = True

  config.optim.lr = 1e-4
  config.optim.warmup_steps = 1_000
  config.optim.weight_decay = 0.02
  return config_lib.lock(config)
