"""LilT: ViT-B/16 and BERT-base both locked except layer norms, bottleneck adapters
(reduction 4) in every block and the projections: about 7% of the parameters train.

  python train.py --config=configs/lilt_b16_bert.py --workdir=/path/run \
      --config.model.image.init=open_clip:/ckpt/ViT-B-16/open_clip_model.safetensors \
      --config.model.text.init=hf_bert:/ckpt/bert-base-uncased --config.data.train=...

Everything else as configs/lit_b16_bert.py.

Meant for LiT's slice, a TPU v5e-8 (v5e:2x4: the batch of 1,024 is 128 per chip), with
--config.model.remat=full at launch. `python -m vlp_jax.preflight
--config=configs/lilt_b16_bert.py --topology=v5e:2x4` with that override (2026-12-08):
fits, peak 2.23 GiB per chip of 15.75
(benchmarks/results/preflight_lilt_b16_bert_v5e_2x4.json).
"""

from __future__ import annotations

import ml_collections

from vlp_jax.configs import lit_b16_bert


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = lit_b16_bert.get_config(arg)
  with config.unlocked():
    config.peft.preset = "lilt"
    config.peft.adapter_reduction = 4
    config.optim.lr = 5e-4  # Adapters start at the identity and need larger steps.
  return config
