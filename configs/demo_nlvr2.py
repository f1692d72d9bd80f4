"""Fine-tunes a `configs/demo.py:method=vlc` run on the generated NLVR2 set: minutes on CPU.

  python train.py --config=configs/demo.py:method=vlc --workdir=/tmp/demo_vlc
  python train.py --config=configs/demo_nlvr2.py:pretrained=/tmp/demo_vlc --workdir=/tmp/demo_nlvr2

The built-in NLVR2 set (input_pipeline/builtin_tasks.py) pairs statements about two
built-in scenes with a true and a false image pair, in NLVR2's jsonl format; results
(accuracy, consistency, the script's predictions file) go to <workdir>/eval/.
"""

from __future__ import annotations

import ml_collections

from configs import demo, demo_vqa
from vlp_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg,
    pretrained="",
    steps=600,
    batch_size=64,
    lr=1e-3,
    lr_decay=0.8,
    num_train=2000,
    num_eval=300,
    statements="",
  )
  config = demo.get_config("method=vlc")
  config.unlock()
  demo_vqa.use_finetuning(config, "vlc_nlvr2", "nlvr2", args)
  # Statement kinds of the generated set (config.finetune.builtin.nlvr2_statements), e.g.
  # "both_colour": colour statements only, no counting or comparing; "": every kind.
  config.finetune.builtin.nlvr2_statements = args.statements
  return config_lib.lock(config)
