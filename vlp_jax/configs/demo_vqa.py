"""Fine-tunes a `configs/demo.py:method=vlc` run on the generated VQA set: minutes on CPU.

  python train.py --config=configs/demo.py:method=vlc --workdir=/tmp/demo_vlc
  python train.py --config=configs/demo_vqa.py:pretrained=/tmp/demo_vlc --workdir=/tmp/demo_vqa

(`pretrained=none` fine-tunes from random initialisation; leaving it out is refused.)

The built-in VQA set (input_pipeline/builtin_vqa.py) asks about the built-in scenes in
VQAv2's file formats; results (official accuracy, per answer type, the test-dev style
answers file) go to <workdir>/eval/. Model and tokenizer are the demo's, so the
pretraining run's checkpoint fits.
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import demo
from vlp_jax.configs.common import use_method


def finetuning_config(
  arg: str | None, method: str, task: str, **task_args: object
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """demo.py:method=vlc set up to fine-tune on `task`'s generated set (demo_vqa.py and
  demo_nlvr2.py), unlocked, and the parsed `arg` (the shared args plus `task_args`)."""
  args = config_lib.parse_arg(
    arg,
    pretrained="",
    steps=600,
    batch_size=64,
    lr=1e-3,
    lr_decay=0.8,
    num_train=2000,
    num_eval=300,
    **task_args,
  )
  config = demo.get_config("method=vlc")
  config.unlock()
  use_method(config, method)
  config.batch_size = args.batch_size
  config.total_steps = args.steps
  config.finetune.pretrained = args.pretrained
  config.finetune.train = "builtin"
  config.finetune.builtin.num_train = args.num_train
  config.finetune.builtin.num_eval = args.num_eval
  config.finetune.builtin.image_size = config.model.image.image_size
  # VLC's 0.5 per block leaves the demo's embeddings at 1/32 of the lr: the generated
  # questions spell words the captions never use, which the embeddings must learn.
  config.finetune.lr_decay = args.lr_decay
  config.optim.lr = args.lr
  config.optim.warmup_steps = args.steps // 10  # VLC: 10% warm-up.
  config.eval.tasks = task
  config.eval.data[task] = "builtin"
  config.eval.every_steps = 0  # Only at the end.
  config.checkpoint_every_steps = args.steps
  return config, args


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config, _ = finetuning_config(arg, "vlc_vqa", "vqa")
  # Generated answers are few and common: every one the most common of >= 3 questions.
  config.finetune.min_answer_count = 3
  return config_lib.lock(config)
