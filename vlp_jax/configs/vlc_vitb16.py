"""VLC pretraining: a ViT-B/16 single-stream transformer with MLM + MAE + ITM + word-patch
alignment (the reference's task_mlm_itm_mae with whole-word masking, step25k, 384 px).

  python train.py --config=configs/vlc_vitb16.py --workdir=/path/run \
      --config.data.train=/data/coco_vg_sbu_gcc --config.data.eval=/data/coco_val \
      --config.data.vocab_file=/data/bert-base-uncased-vocab.txt \
      --config.model.image.init=timm:/data/mae_pretrain_vit_base_full.pth
  python train.py --config=configs/vlc_vitb16.py:wpa=False,flip=False ...  # Without WPA, flips.

The reference values (guilk/VLC vlc/config.py, vlc/modules/objectives.py,
vlc/transforms/mae_transforms.py): batch 4,096, 25k steps, AdamW lr 1e-4 (0.9, 0.98),
wd 0.01, 10% warm-up then linear decay; whole-word MLM 15%, 60% of the patches masked,
MAE weight 1, ITM weight 1, word-patch alignment always on at 0.1 (the training step sums
every "loss" output); images RandomResizedCrop(scale=(0.8, 1.0)) + horizontal flip (the
"mae" transform), ImageNet's pixel statistics; 40 text tokens.

The MAE checkpoint initialises encoder and decoder (weights/timm_vit.import_mae_into_vlc);
without one both start at random. No evaluation task by default: VLC has no separate
embeddings, so the existing retrieval / classification tasks do not apply.

Meant for a TPU v5e-64 slice (v5e:8x8: the batch of 4,096 is 64 per chip), with
--config.model.remat=full at launch (the single-stream encoder has no scanned layout).
`python -m vlp_jax.preflight --config=configs/vlc_vitb16.py --topology=v5e:8x8` with that
override (2026-12-08): fits, peak 6.22 GiB per chip of 15.75
(benchmarks/results/preflight_vlc_vitb16_v5e_8x8.json).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs.common import base_config

# MAE's pixel statistics (ImageNet's, in [0, 1]): an MAE-initialised encoder expects them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg, variant="B/16", batch_size=4096, steps=25_000, image_size=384, wpa=True, flip=True
  )
  config = base_config("vlc")
  config.batch_size = args.batch_size
  config.total_steps = args.steps

  config.model.image.variant = args.variant
  config.model.image.image_size = args.image_size
  config.model.image.layer_norm_eps = 1e-6  # MAE's ViT layout.
  config.model.image.patch_bias = True
  config.model.image.pre_norm = False
  config.model.image.mean = IMAGENET_MEAN
  config.model.image.std = IMAGENET_STD
  config.model.text.context_length = 40  # VLC's max_text_len: 40 learned positions.
  # VLC's drop_rate 0.1 (vlc/config.py) reaches only its text BertEmbeddings
  # (vlc/modules/vlc_module.py); its ViT blocks are built without dropout.
  config.model.text.dropout = 0.1
  config.data.tokenizer = "wordpiece"  # bert-base-uncased's vocabulary in the paper.
  # VLC's "mae" transform. A flip makes a caption's "left" and "right" wrong; the
  # reference flips all the same (flip=False turns it off).
  config.data.crop_scale = (0.8, 1.0)
  config.data.flip = args.flip

  config.vlc.wpa = args.wpa  # Weight config.vlc.wpa_weight: 0.1.

  # AdamW lr 1e-4 (0.9, 0.98), wd 0.01, eps 1e-8 (torch's default, as ViLT / VLC),
  # warm-up over the first 10% of the steps, then linear decay to 0.
  config.optim.schedule = "linear"
  config.optim.lr = 1e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.98
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.01
  config.optim.warmup_steps = args.steps // 10
  config.optim.end_lr_ratio = 0.0

  config.eval.tasks = ""
  return config_lib.lock(config)
