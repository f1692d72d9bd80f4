"""Fine-tunes a `configs/demo.py:method=vlc` run on the generated NLVR2 set: minutes on CPU.

  python train.py --config=configs/demo.py:method=vlc --workdir=/tmp/demo_vlc
  python train.py --config=configs/demo_nlvr2.py:pretrained=/tmp/demo_vlc --workdir=/tmp/demo_nlvr2

The built-in NLVR2 set (input_pipeline/builtin_nlvr2.py) pairs statements about two
built-in scenes with a true and a false image pair, in NLVR2's jsonl format; results
(accuracy, consistency, the script's predictions file) go to <workdir>/eval/.
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import demo_vqa


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config, args = demo_vqa.finetuning_config(arg, "vlc_nlvr2", "nlvr2", statements="")
  # Statement kinds of the generated set (config.finetune.builtin.nlvr2_statements), e.g.
  # "both_colour": colour statements only, no counting or comparing; "": every kind.
  config.finetune.builtin.nlvr2_statements = args.statements
  return config_lib.lock(config)
