"""ALBEF (ViT-B/16 + BERT-base, fusion from layer 6): the reference pretraining recipe.

  python train.py --config=configs/albef_vitb16.py --workdir=/path/run \
      --config.data.train=/data/cc3m --config.data.eval=/data/coco_val \
      --config.model.image.init=timm:/ckpt/deit_base_patch16_224.safetensors \
      --config.model.text.init=hf_bert:/ckpt/bert-base-uncased

The reference (ALBEF's configs/Pretrain.yaml and Pretrain.py): 8 GPUs x 64 images,
256 px, AdamW lr 1e-4, weight decay 0.02, warm-up from 1e-5 over 2,000 steps, cosine
to 1e-5 over 30 epochs, ITA/ITM/MLM with equal weights, queue 65,536, momentum 0.995,
alpha 0.4 ramped over the first epoch, CLIP's pixel statistics. Where we differ:
- Gradients are clipped at global norm 1.0 (config.optim.grad_clip_norm); ALBEF does not clip.
- ALBEF's image tower is a DeiT-B/16 (timm) at 256 px with interpolated position
  embeddings; the timm importer takes a checkpoint whose grid matches image_size.

Meant for a TPU v5e-8 slice (v5e:2x4: the batch of 512 is ALBEF's 64 per device), with
--config.model.remat=full at launch (its towers have no scanned layout). Not yet shown to
fit: `python -m vlp_jax.preflight --config=configs/albef_vitb16.py --topology=v5e:2x4
--config.model.remat=full` did not finish XLA's compile of the unrolled step within 900 s
on a 2-core host (2026-12-08, twice); run it on a larger host before renting.
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs.common import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, batch_size=512, epochs=30.0, image_size=256)
  config = base_config("albef")
  config.batch_size = args.batch_size  # ALBEF: 64 per GPU on 8 GPUs.
  config.num_epochs = args.epochs

  config.model.embed_dim = 256  # ITA projections.
  config.model.image.variant = "B/16"
  config.model.image.image_size = args.image_size
  # DeiT (timm) architecture options; pixel statistics stay CLIP's, as ALBEF normalises.
  config.model.image.layer_norm_eps = 1e-6
  config.model.image.patch_bias = True
  config.model.image.pre_norm = False
  config.model.text.kind = "bert"
  config.model.text.context_length = 30
  config.model.text.max_positions = 512  # bert-base-uncased's position table.
  config.model.text.width = 768
  config.model.text.depth = 12
  config.model.text.num_heads = 12
  config.model.text.mlp_dim = 3072
  config.model.text.layer_norm_eps = 1e-12
  # ALBEF's configs/config_bert.json: hidden_dropout_prob and attention_probs_dropout_prob
  # 0.1. Its ViT has none (models/vit.py: drop_rate 0), the base config's image default.
  config.model.text.dropout = 0.1
  config.model.text.attention_dropout = 0.1

  config.albef.fusion_layer = 6
  config.albef.queue_size = 65_536
  config.albef.momentum = 0.995
  config.albef.alpha = 0.4
  config.albef.alpha_ramp_steps = 0  # The first epoch.
  config.albef.mlm_probability = 0.15

  config.data.crop_scale = (0.2, 1.0)  # ALBEF's RandomResizedCrop(256, scale=(0.2, 1.0)).
  config.data.flip = True

  config.optim.lr = 1e-4
  config.optim.warmup_steps = 2_000
  config.optim.warmup_start_ratio = 0.1  # From 1e-5.
  config.optim.end_lr_ratio = 0.1  # Cosine down to min_lr 1e-5.
  config.optim.weight_decay = 0.02
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999  # timm's AdamW defaults, which ALBEF's optimizer factory uses.
  config.optim.eps = 1e-8

  config.eval.rerank_k = 128  # ALBEF's k_test for Flickr30k (COCO: 256).
  return config_lib.lock(config)
