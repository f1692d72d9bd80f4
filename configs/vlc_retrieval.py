"""VLC fine-tuned for image-text retrieval (task_finetune_irtr_{coco,f30k}_mae_randaug):
a rank head initialised from the ITM head, each image ranked against its caption and 15
others (cross-entropy), plus 0.5 x ITM with the ITM head frozen.

  python train.py --config=configs/vlc_retrieval.py:pretrained=/runs/vlc_pretrain,dataset=f30k \
      --workdir=/runs/vlc_f30k \
      --config.data.vocab_file=/data/bert-base-uncased-vocab.txt \
      --config.data.train=/data/f30k_train_shards --config.data.eval=/data/f30k_test_shards \
      --config.eval.data.itm_retrieval=heldout \
      --config.finetune.shortlist=/runs/clip_f30k   # optional: re-rank a CLIP's top 128

Training reads config.data.train's image-text shards (input_pipeline/convert.py); the
other rows' captions of a batch stand in for VLC's captions drawn from the dataset.
Evaluation (itm_retrieval) scores every image-caption pair with the rank head, as VLC's
compute_irtr_recall: Flickr30k's 1k x 5k test is 5M pairs, COCO's 5k x 25k 125M. With
`shortlist=` (config.finetune.shortlist: a CLIP run's workdir or a converted CLIP
directory) the rank head only re-ranks each query's `shortlist_k` nearest by that CLIP
(COCO: (25k + 5k) x 128 pairs, not 125M); a match outside the shortlist is a miss.
Not reproduced: RandAugment and dropout 0.1.
"""

from __future__ import annotations

import ml_collections

from configs import vlc_vitb16, vlc_vqa
from vlp_jax import config_lib

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
    lr=1e-4,
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
  config.finetune.itm_weight = 0.5
  config.data.crop_scale = (0.8, 1.0)  # Mild crops: captions name what is in the picture.
  config.finetune.shortlist = args.shortlist
  config.finetune.shortlist_k = args.shortlist_k
  config.eval.tasks = "itm_retrieval"
  config.eval.every_steps = 0  # All pairs: only at the end.
  return config_lib.lock(config)
