"""VLC fine-tuned on NLVR2 (the reference's task_finetune_nlvr2_mae_randaug): two encoder
passes per statement (token types 1 and 2), the pooled states concatenated -> MLP.

  python train.py --config=configs/vlc_nlvr2.py:pretrained=/runs/vlc_pretrain \
      --workdir=/runs/vlc_nlvr2 \
      --config.data.vocab_file=/data/bert-base-uncased-vocab.txt \
      --config.finetune.train=/data/nlvr2/train.json,images=/data/nlvr2/images/train \
      --config.eval.data.nlvr2=/data/nlvr2/dev.json,images=/data/nlvr2/dev

The reference values (guilk/VLC README.md's NLVR command and vlc/config.py's
task_finetune_nlvr2_mae_randaug): 384 px, lr 5e-4, batch 128, 20 epochs, 10% warm-up then
linear decay, layer-wise lr decay 0.5, training images RandomResizedCrop(scale=(0.9, 1.0))
without flips. Evaluation writes accuracy and consistency (and the script's predictions
file) under <workdir>/eval/; eval.py --tasks=nlvr2 --data.nlvr2=test1.json,... scores test-P.
Dropout 0.1 on the text embeddings, as VLC's drop_rate (configs/vlc_vitb16.py).
Not reproduced: RandAugment (docs/DECISIONS.md).

Meant for a TPU v5e-8 slice (v5e:2x4: the batch of 128 is 16 statements, 32 image passes,
per chip), with --config.model.remat=full at launch. `python -m vlp_jax.preflight
--config=configs/vlc_nlvr2.py --topology=v5e:2x4 --config.model.remat=full
--config.finetune.train=builtin` (the head needs no data; 2026-12-08): fits, peak
2.52 GiB per chip of 15.75 (benchmarks/results/preflight_vlc_nlvr2_v5e_2x4.json).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import vlc_vitb16, vlc_vqa

# 20 epochs over NLVR2's 86,373 training statements at batch 128.
NLVR2_STEPS = 13_500


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg, pretrained="", steps=NLVR2_STEPS, batch_size=128, image_size=384, lr=vlc_vqa.REFERENCE_LR
  )
  config = vlc_vitb16.get_config(f"image_size={args.image_size}")
  config.unlock()
  vlc_vqa.use_finetuning(config, "vlc_nlvr2", args)
  config.eval.tasks = "nlvr2"
  config.eval.every_steps = args.steps // 20  # Once an epoch, as the reference.
  return config_lib.lock(config)
