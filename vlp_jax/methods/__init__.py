"""Training methods: one module each, chosen by `config.method` from `METHODS`.

A method (`base.Method`) provides its batch fields, parameters and extra state, loss,
optimizer groups, prediction functions for evaluation and optional pipeline fields; the
trainer runs any of them. How to add one: docs/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Callable

from vlp_jax.methods import contrastive, negclip
from vlp_jax.methods.base import DataContext, Method, MethodContext, PredictFn

# config.method -> builder. "contrastive" covers CLIP, SigLIP, FLIP / cluster / k-means
# masking, LiT / LilT / BitFit / LoRA and pretrained towers (config.loss, masking, peft).
METHODS: dict[str, Callable[[MethodContext], Method]] = {
  "contrastive": contrastive.create,
  "negclip": negclip.create,
}


def create_method(ctx: MethodContext) -> Method:
  """The configured method (ValueError naming config.method or another bad key)."""
  name = ctx.config.method
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not one of {sorted(METHODS)}")
  return METHODS[name](ctx)


__all__ = ["METHODS", "DataContext", "Method", "MethodContext", "PredictFn", "create_method"]
