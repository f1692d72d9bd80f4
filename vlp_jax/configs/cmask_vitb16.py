"""CMask (ViT-B/16 + BERT-base ALBEF with a masking agent): the curriculum-masking recipe.

  python train.py --config=configs/cmask_vitb16.py --workdir=/path/run \
      --config.data.train=/data/cc3m --config.data.eval=/data/coco_val \
      --config.model.image.init=timm:/ckpt/deit_base_patch16_224.safetensors \
      --config.model.text.init=hf_bert:/ckpt/bert-base-uncased

configs/albef_vitb16.py's ALBEF (CMask's own configs use ALBEF's Pretrain.yaml), with
30% of each caption masked, every chosen token replaced by [MASK], chosen by an agent of
two cross-attention layers that takes over from random masking during the first 10,000
steps. The released CMask code never trains its agent; the reward and its REINFORCE
update follow the paper's description (vlp_jax/methods/cmask.py).

Meant for ALBEF's slice, a TPU v5e-8 (v5e:2x4, 64 per chip), with
--config.model.remat=full at launch; not yet pre-flighted (configs/albef_vitb16.py's
unrolled step did not compile within 900 s on a 2-core host).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import albef_vitb16
from vlp_jax.configs.common import use_method


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, batch_size=512, epochs=30.0, curriculum_steps=10_000)
  config = albef_vitb16.get_config(f"batch_size={args.batch_size},epochs={args.epochs}")
  config.unlock()
  use_method(config, "cmask")  # Keeps the ALBEF recipe's config.albef.
  config.cmask.mask_ratio = 0.3
  config.cmask.curriculum_steps = args.curriculum_steps
  config.cmask.agent_layers = 2
  config.cmask.agent_lr = 1e-4
  # The information flow into the agent's tokens plus the MLM-loss drop the image brings:
  # on the built-in data, flow alone taught the agent to mask size words and "a".
  config.cmask.gain_weight = 5.0
  config.cmask.entropy_coef = 0.2
  return config_lib.lock(config)
