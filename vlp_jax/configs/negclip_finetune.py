"""NegCLIP: fine-tune a pretrained CLIP ViT-B/32 with hard negatives (Yuksekgonul et
al., 2023): every batch holds B images, their B nearest-neighbour images, and for both
their captions and word-swapped negatives (2B images, 4B texts).

  python train.py --config=configs/negclip_finetune.py --workdir=/path/run \
      --config.model.init=open_clip:/ckpt/ViT-B-32-openai.safetensors \
      --config.data.vocab_file=/ckpt/bpe_simple_vocab_16e6.txt.gz \
      --config.data.train=/data/coco_train --config.data.eval=/data/coco_val

Hard images are mined once with the starting model into <workdir>/negclip_neighbours.npy.
Negatives use spaCy's tagger when en_core_web_sm is installed (pip install spacy &&
python -m spacy download en_core_web_sm), else the built-in dataset's lexicon plus
any-two-word swaps. The paper's recipe (5 epochs on COCO, small lr) is the default.

Meant for a TPU v5e-4 slice (v5e:2x2: the batch of 256 is 64 per chip, 128 images and 256
texts with the hard ones), with --config.model.scan_layers=True --config.model.remat=full
at launch. `python -m vlp_jax.preflight --config=configs/negclip_finetune.py
--topology=v5e:2x2` with those two overrides (2026-12-08): fits, peak 2.84 GiB per chip
of 15.75 (benchmarks/results/preflight_negclip_finetune_v5e_2x2.json).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs.common import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, batch_size=256, epochs=5.0, lr=1e-6)
  config = base_config("negclip")
  config.batch_size = args.batch_size  # Images per batch before hard images: 4x texts.
  config.num_epochs = args.epochs

  # OpenAI's CLIP ViT-B/32 layout (open_clip "ViT-B-32-quickgelu").
  config.model.init = "open_clip:pretrained/ViT-B-32-openai.safetensors"
  config.model.activation = "quick_gelu"
  config.model.embed_dim = 512
  config.model.image.variant = "B/32"
  config.model.text.vocab_size = 49_408
  config.model.text.context_length = 77
  config.data.tokenizer = "clip_bpe"
  config.data.vocab_file = "pretrained/bpe_simple_vocab_16e6.txt.gz"

  config.optim.lr = args.lr
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.1
  config.eval.tasks = "heldout"
  return config_lib.lock(config)
