"""Training methods: one module each, chosen by `config.method` from `METHODS`.

A method (`base.Method`) provides its batch fields, parameters and extra state, loss,
optimizer groups, prediction functions for evaluation and optional pipeline fields; the
trainer runs any of them. How to add one: docs/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Callable

from vlp_jax.config_lib import ConfigBlock
from vlp_jax.methods import (
  albef,
  cmask,
  contrastive,
  negclip,
  vlc,
  vlc_classify,
  vlc_finetune_config,
  vlc_nlvr2,
  vlc_retrieval,
  vlc_vqa,
)
from vlp_jax.methods.base import DataContext, Method, MethodContext, PredictFn

# config.method -> builder. "contrastive" covers CLIP, SigLIP, FLIP / cluster / k-means
# masking, LiT / LilT / BitFit / LoRA and pretrained towers (config.loss, masking, peft).
METHODS: dict[str, Callable[[MethodContext], Method]] = {
  "contrastive": contrastive.create,
  "negclip": negclip.create,
  "albef": albef.create,  # ALBEF: ITA + ITM + MLM, momentum model, queues (config.albef).
  "cmask": cmask.create,  # ALBEF + a masking agent and its curriculum (config.cmask).
  "vlc": vlc.create,  # VLC: single-stream MLM + MAE + ITM (config.vlc).
  # Fine-tuning a VLC run (config.finetune): VQAv2, NLVR2, ITM retrieval, classification.
  # One module each over methods/vlc_finetune.py.
  "vlc_vqa": vlc_vqa.create,
  "vlc_nlvr2": vlc_nlvr2.create,
  "vlc_retrieval": vlc_retrieval.create,
  "vlc_classify": vlc_classify.create,
}


# config.method -> the config blocks it reads beyond the base config (vlp_jax/configs/
# common.py), each declared on its method's module (defaults and rules): base_config(method)
# merges them, so a run's config.json carries only its own. A method not listed has none.
CONFIG_BLOCKS: dict[str, tuple[ConfigBlock, ...]] = {
  "negclip": (negclip.CONFIG_BLOCK,),
  "albef": (albef.CONFIG_BLOCK,),
  "cmask": (albef.CONFIG_BLOCK, cmask.CONFIG_BLOCK),
  "vlc": (vlc.CONFIG_BLOCK,),
  # The fine-tuning methods build VLC's encoder (and read its decoder fields) and read
  # their own config.finetune (vlc_finetune_config.py).
  "vlc_vqa": (vlc.CONFIG_BLOCK, vlc_finetune_config.CONFIG_BLOCK),
  "vlc_nlvr2": (vlc.CONFIG_BLOCK, vlc_finetune_config.CONFIG_BLOCK),
  "vlc_retrieval": (vlc.CONFIG_BLOCK, vlc_finetune_config.CONFIG_BLOCK),
  "vlc_classify": (vlc.CONFIG_BLOCK, vlc_finetune_config.CONFIG_BLOCK),
}


def config_blocks(method: str) -> tuple[ConfigBlock, ...]:
  """The config blocks of `method` (none for a method not in CONFIG_BLOCKS)."""
  return CONFIG_BLOCKS.get(method, ())


def block_owners() -> dict[str, list[str]]:
  """Every method block's name -> the methods that read it."""
  owners: dict[str, list[str]] = {}
  for method, blocks in CONFIG_BLOCKS.items():
    for block in blocks:
      owners.setdefault(block.name, []).append(method)
  return owners


def create_method(ctx: MethodContext) -> Method:
  """The configured method (ValueError naming config.method or another bad key)."""
  name = ctx.config.method
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not one of {sorted(METHODS)}")
  return METHODS[name](ctx)


__all__ = [
  "CONFIG_BLOCKS",
  "METHODS",
  "DataContext",
  "Method",
  "MethodContext",
  "PredictFn",
  "block_owners",
  "config_blocks",
  "create_method",
]
