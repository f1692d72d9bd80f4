"""VLC fine-tuned on VQAv2 (the reference's task_finetune_vqa_mae_randaug): a VLC
pretraining run's encoder, an MLP head over 3,129 answers, BCE on the soft scores.

  python train.py --config=configs/vlc_vqa.py:pretrained=/runs/vlc_pretrain \
      --workdir=/runs/vlc_vqa \
      --config.data.vocab_file=/data/bert-base-uncased-vocab.txt \
      --config.finetune.train="/data/vqa/v2_OpenEnded_mscoco_train2014_questions.json,annotations=/data/vqa/v2_mscoco_train2014_annotations.json,images=/data/coco;/data/vqa/v2_OpenEnded_mscoco_val2014_questions.json,annotations=/data/vqa/v2_mscoco_val2014_annotations.json,images=/data/coco" \
      --config.eval.data.vqa="/data/vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json,images=/data/coco"

The reference values (guilk/VLC README.md's VQAv2 command and vlc/config.py's
task_finetune_vqa_mae_randaug): 576 px, lr 5e-4, batch 256, 10 epochs, 10% warm-up then
linear decay, layer-wise lr decay 0.5 (vlc/modules/vlc_utils.py), training images
RandomResizedCrop(scale=(0.9, 1.0)) without flips ("mae_randaug",
vlc/transforms/mae_transforms.py). The model and tokenizer are the pretraining recipe's
(configs/vlc_vitb16.py), so its checkpoint fits at any image size (the patch positions are
fixed sin-cos ones). Evaluation writes the official accuracy (when the questions have
annotations) and the test-dev results file for the evaluation server under
<workdir>/eval/. ViLT and VLC train on train2014 + val2014 minus 1,000 held-out val
images; the reader takes whole files, so pass a trimmed val file for that split.
Dropout 0.1 on the text embeddings, as VLC's drop_rate (configs/vlc_vitb16.py).
Not reproduced: RandAugment ("mae_randaug") (docs/DECISIONS.md).

Meant for a TPU v5e-16 slice (v5e:4x4: the batch of 256 is 16 per chip at 576 px), with
--config.model.remat=full at launch. `python -m vlp_jax.preflight --config=configs/vlc_vqa.py
--topology=v5e:4x4 --config.model.remat=full --config.finetune.train=builtin
--config.finetune.answers=<answers file>` (the head's size is the answer count: a file of
3,129, 2026-12-08): fits, peak 4.85 GiB per chip of 15.75
(benchmarks/results/preflight_vlc_vqa_v5e_4x4.json).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import vlc_vitb16
from vlp_jax.configs.common import use_method

# 10 epochs over VQAv2 train + val (~650k questions) at batch 256.
VQA_STEPS = 25_000
# VLC's fine-tuning lr (README.md: learning_rate=5e-4 for VQA, NLVR2 and retrieval; the
# 1e-4 of its config.py's task entries is overridden on every command line there).
REFERENCE_LR = 5e-4
# RandomResizedCrop's area range in VLC's "mae_randaug" fine-tuning transform.
REFERENCE_CROP_SCALE = (0.9, 1.0)


def use_finetuning(
  config: ml_collections.ConfigDict, method: str, args: ml_collections.ConfigDict
) -> None:
  """VLC's fine-tuning recipe shared by the task configs: AdamW at args.lr (0.9, 0.98),
  wd 0.01, 10% warm-up then linear decay to 0, layer-wise lr decay 0.5 per block, heads
  at the base lr, training images cropped as VLC's "mae_randaug" (area 0.9-1, no flip)."""
  use_method(config, method)
  config.batch_size = args.batch_size
  config.total_steps = args.steps
  config.finetune.pretrained = args.pretrained
  config.finetune.train = ""  # The task's training data: on the command line.
  config.finetune.lr_decay = 0.5
  config.finetune.head_lr_multiplier = 1.0
  config.finetune.crop_scale = REFERENCE_CROP_SCALE
  config.finetune.flip = False
  config.optim.lr = args.lr
  config.optim.warmup_steps = args.steps // 10
  config.optim.schedule = "linear"
  config.optim.end_lr_ratio = 0.0
  config.checkpoint_every_steps = 1_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg, pretrained="", steps=VQA_STEPS, batch_size=256, image_size=576, lr=REFERENCE_LR
  )
  config = vlc_vitb16.get_config(f"image_size={args.image_size}")
  config.unlock()
  use_finetuning(config, "vlc_vqa", args)
  config.finetune.min_answer_count = 9  # 3,129 answers over VQAv2 train + val.
  config.eval.tasks = "vqa"
  config.eval.every_steps = args.steps // 10  # VLC validates every tenth of the run.
  return config_lib.lock(config)
