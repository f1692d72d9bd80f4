"""Optimizer and learning-rate schedule from `config.optim`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax

from vlp_jax import peft

SCHEDULES = ("cosine", "linear")


def create_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from `lr * warmup_start_ratio` to `lr`, then cosine (CLIP, ALBEF) or
  linear (VLC, ViLT) decay to `lr * end_lr_ratio`."""
  if optim.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={optim.schedule!r} is not one of {SCHEDULES}")
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  start, end = optim.lr * optim.warmup_start_ratio, optim.lr * optim.end_lr_ratio
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=start,
      peak_value=optim.lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=end,
    )
  return optax.join_schedules(
    [
      optax.linear_schedule(start, optim.lr, warmup),
      optax.linear_schedule(optim.lr, end, max(total_steps - warmup, 1)),
    ],
    [warmup],
  )


def decay_mask(params: optax.Params) -> optax.Params:
  """Weight decay on matrices only: no decay on biases, LayerNorm, class token, temperature."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(
  optim: ml_collections.ConfigDict,
  schedule: optax.Schedule,
  param_labels: Callable[[Any], Any] | None = None,
  groups: Mapping[str, optax.GradientTransformation] | None = None,
) -> optax.GradientTransformation:
  """Clipping + AdamW; with `param_labels` (a method's labels) only "train" parameters
  get them, "freeze" ones get zero updates and no optimizer state (clipping sees only
  the trainable gradients), and every other label gets its transform from `groups`
  (e.g. an agent's own optimizer, or a layer's decayed learning rate)."""
  adamw = optax.chain(
    optax.clip_by_global_norm(optim.grad_clip_norm),
    optax.adamw(
      schedule,
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=decay_mask,
    ),
  )
  if param_labels is None:
    if groups:
      raise ValueError(f"optimizer groups {sorted(groups)} need parameter labels")
    return adamw
  transforms = {peft.TRAIN: adamw, peft.FREEZE: optax.set_to_zero(), **(groups or {})}
  return optax.multi_transform(transforms, param_labels)
