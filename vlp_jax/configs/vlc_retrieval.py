"""VLC fine-tuned for image-text retrieval (task_finetune_irtr_{coco,f30k}_mae_randaug):
a rank head initialised from the ITM head, each image ranked against its caption and 15
others (cross-entropy); the ITM head stays frozen and out of the loss.

  python train.py --config=configs/vlc_retrieval.py:pretrained=/runs/vlc_pretrain,dataset=f30k \
      --workdir=/runs/vlc_f30k \
      --config.data.vocab_file=/data/bert-base-uncased-vocab.txt \
      --config.data.train=/data/f30k_train_shards --config.data.eval=/data/f30k_test_shards \
      --config.eval.data.itm_retrieval=heldout \
      --config.eval.itm_retrieval.shortlist=/runs/clip_f30k   # optional: re-rank a CLIP's top 128

Training reads config.data.train's image-text shards (input_pipeline/convert.py); the
other rows' captions of a batch stand in for VLC's captions drawn from the dataset.
Evaluation (itm_retrieval) scores every image-caption pair with the rank head, as VLC's
compute_irtr_recall: Flickr30k's 1k x 5k test is 5M pairs, COCO's 5k x 25k 125M. With
`shortlist=` (config.eval.itm_retrieval.shortlist: a CLIP run's workdir or a converted CLIP
directory) the rank head only re-ranks each query's `shortlist_k` nearest by that CLIP
(COCO: (25k + 5k) x 128 pairs, not 125M); a match outside the shortlist is a miss.

The reference values (guilk/VLC README.md's IR/TR commands, vlc/config.py's
task_finetune_irtr_*_mae_randaug): 384 px, lr 5e-4, batch 256, 15 drawn captions, 10%
warm-up then linear decay, layer-wise lr decay 0.5, training images
RandomResizedCrop(scale=(0.9, 1.0)) without flips. Its config lists "itm": 0.5 beside
"irtr": 1, but vlc/modules/vlc_utils.py's set_task keeps only losses of weight >= 1 (as
ViLT's): the rank loss trains alone (itm_weight=0.5 adds the listed ITM term).
Dropout 0.1 on the text embeddings, as VLC's drop_rate (configs/vlc_vitb16.py).
Not reproduced: RandAugment (docs/DECISIONS.md).

Meant for a TPU v5e-64 slice (v5e:8x8: the batch of 256 is 4 images per chip, each
scored against 16 captions), with --config.model.remat=full at launch. `python -m
vlp_jax.preflight --config=configs/vlc_retrieval.py --topology=v5e:8x8
--config.model.remat=full` (2026-12-08): fits, peak 4.58 GiB per chip of 15.75
(benchmarks/results/preflight_vlc_retrieval_v5e_8x8.json); on v5e:4x4 (16 per chip) it
does not (35.26 GiB of temporaries: 256 image-caption passes per chip).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import vlc_vitb16, vlc_vqa

# Epochs over the training captions at batch 256 (COCO Karpathy train + restval: 566k
# captions, 20 epochs; Flickr30k: 145k captions, 10 epochs), as the reference.
STEPS = {"coco": 44_250, "f30k": 5_660}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg,
    pretrained="",
    dataset="coco",
    steps=0,
    batch_size=256,
    image_size=384,
    lr=vlc_vqa.REFERENCE_LR,
    itm_weight=0.0,
    shortlist="",
    shortlist_k=128,
  )
  if args.dataset not in STEPS:
    raise config_lib.ConfigError(
      f"configs/vlc_retrieval.py: dataset={args.dataset!r} is not one of {sorted(STEPS)}"
    )
  with args.unlocked():
    args.steps = args.steps or STEPS[args.dataset]
  config = vlc_vitb16.get_config(f"image_size={args.image_size}")
  config.unlock()
  vlc_vqa.use_finetuning(config, "vlc_retrieval", args)
  config.finetune.num_negatives = 15  # VLC's draw_false_text.
  config.finetune.itm_weight = args.itm_weight  # 0: VLC's set_task drops its 0.5 x ITM.
  # Retrieval reads the image-text shards (config.data), cropped as "mae_randaug" does.
  config.data.crop_scale = vlc_vqa.REFERENCE_CROP_SCALE
  config.data.flip = False
  config.eval.itm_retrieval.shortlist = args.shortlist
  config.eval.itm_retrieval.shortlist_k = args.shortlist_k
  config.eval.tasks = "itm_retrieval"
  config.eval.every_steps = 0  # All pairs: only at the end.
  return config_lib.lock(config)
