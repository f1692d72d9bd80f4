"""VLC's encoder fine-tuned on ImageNet-1k (the reference's imagenet_classification,
MAE's fine-tuning recipe): the image alone, mean-pooled patch states -> LayerNorm ->
linear classifier, layer-wise lr decay 0.65.

  python train.py --config=configs/vlc_classify.py:pretrained=/runs/vlc_pretrain \
      --workdir=/runs/vlc_imagenet \
      --config.data.vocab_file=/data/bert-base-uncased-vocab.txt \
      --config.finetune.train=/data/imagenet \
      --config.eval.data.classify_finetuned=/data/imagenet,split=val

The dataset is a class-folder tree (train/ and val/ of class folders) or a CLIP_benchmark
wds directory (input_pipeline/classification_readers.py). The reference values (guilk/VLC
imagenet_classification/README.md and main_finetune.py): batch 1024, lr 5e-4 x 1024 / 256,
AdamW (0.9, 0.999), wd 0.05, 100 epochs with 5 of warm-up, cosine decay to 1e-6, layer
decay 0.65, label smoothing 0.1, random-resized crops (0.08-1) and flips, 224 px (the
repository's top README.md passes --input_size 384 instead). Not reproduced: RandAugment
(timm's rand-m9-mstd0.5-inc1), mixup 0.8, cutmix 1.0, random erasing 0.25, drop path 0.1;
MAE pools the patch states before its final norm, the encoder here applies it to every
token first; gradients are clipped (MAE does not). docs/DECISIONS.md lists them.

Meant for a TPU v5e-8 slice (v5e:2x4: the batch of 1,024 is 128 per chip), with
--config.model.remat=full at launch. `python -m vlp_jax.preflight
--config=configs/vlc_classify.py --topology=v5e:2x4 --config.model.remat=full
--config.finetune.train=<class folders>` (the head's size is the training set's class
count: a tree of 1,000 class folders, 2026-12-08): fits, peak 2.68 GiB per chip of 15.75
(benchmarks/results/preflight_vlc_classify_v5e_2x4.json).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import vlc_vitb16, vlc_vqa

IMAGENET_TRAIN = 1_281_167
MIN_LR = 1e-6  # main_finetune.py's --min_lr.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg, pretrained="", epochs=100, batch_size=1024, image_size=224, lr=2e-3
  )
  steps_per_epoch = IMAGENET_TRAIN // args.batch_size
  steps = args.epochs * steps_per_epoch
  config = vlc_vitb16.get_config(f"image_size={args.image_size}")
  config.unlock()
  recipe = ml_collections.ConfigDict(
    {"pretrained": args.pretrained, "batch_size": args.batch_size, "steps": steps, "lr": args.lr}
  )
  vlc_vqa.use_finetuning(config, "vlc_classify", recipe)
  config.finetune.lr_decay = 0.65
  config.finetune.label_smoothing = 0.1
  config.finetune.crop_scale = (0.08, 1.0)
  config.finetune.flip = True
  config.optim.schedule = "cosine"  # MAE's.
  config.optim.end_lr_ratio = MIN_LR / args.lr  # MAE's cosine ends at min_lr.
  config.optim.b2 = 0.999
  config.optim.weight_decay = 0.05
  config.optim.warmup_steps = 5 * steps_per_epoch
  config.eval.tasks = "classify_finetuned"
  config.eval.every_steps = 10 * steps_per_epoch
  config.checkpoint_every_steps = steps_per_epoch
  return config_lib.lock(config)
