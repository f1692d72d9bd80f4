"""Which parameters train: CLIP, LiT, LilT, BitFit, unlock-last-layer and LoRA presets.

A mode per tower (config.peft.preset, or config.peft.image / config.peft.text), then one
label per parameter, decided from its path ("text/transformer/resblocks_3/ln_1/scale").
The optimizer (optim.create_optimizer) updates only "train" parameters and keeps no state
for frozen ones; the train step stops gradients at frozen parameters, so backpropagation
skips what nothing trainable needs (all of the image tower under LiT).

Scanned towers (config.model.scan_layers) hold each block parameter as one array over
all blocks: a label is decided per block as for the unrolled paths, and a mode that
treats blocks differently (unlock_last, a train_also regex naming resblocks_<i>) cannot
be expressed and is refused with a ConfigError.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from vlp_jax.config_lib import ConfigError
from vlp_jax.models.layers import Tuning
from vlp_jax.models.stacking import STACKED_BLOCKS

TRAIN, FREEZE = "train", "freeze"

# What trains in one tower (its parameters, including its projection to the joint space).
TOWER_MODES = {
  "all": "every parameter",
  "frozen": "nothing (a locked tower, as LiT's image tower)",
  "lilt": "layer norms, adapters and the projection (LilT)",
  "bitfit": "biases and the projection (BitFit)",
  "unlock_last": "the last block, the final norm and the projection",
  "lora": "the LoRA factors A and B only",
}
# config.peft.preset -> (image tower mode, text tower mode).
PRESETS = {
  "all": ("all", "all"),  # CLIP.
  "lit": ("frozen", "all"),  # LiT: locked image tuning.
  "lilt": ("lilt", "lilt"),
  "bitfit": ("bitfit", "bitfit"),
  "unlock_last": ("unlock_last", "unlock_last"),
  "lora": ("lora", "lora"),
}
TOWERS = ("visual", "text")

_NORM = re.compile(r"(^|_)ln(_|\d*$)|layernorm|norm", re.IGNORECASE)
_BLOCK = re.compile(r"^(resblocks|layer)_(\d+)$")
_PROJECTIONS = ("proj", "text_projection")
_TEMPERATURE = ("logit_scale", "logit_bias")


def tower_modes(peft: ml_collections.ConfigDict) -> dict[str, str]:
  """{"visual": mode, "text": mode}: the preset, with config.peft.image/text overrides."""
  check_config(peft)
  image, text = PRESETS[peft.preset]
  return {"visual": peft.image or image, "text": peft.text or text}


def tuning_from_config(peft: ml_collections.ConfigDict) -> dict[str, Tuning]:
  """Per tower, the adapters / LoRA factors its mode needs."""
  targets = tuple(t.strip() for t in peft.lora_targets.split(",") if t.strip())
  return {
    tower: Tuning(
      adapter_reduction=peft.adapter_reduction if mode == "lilt" else 0,
      lora_rank=peft.lora_rank if mode == "lora" else 0,
      lora_alpha=peft.lora_alpha,
      lora_targets=targets,
    )
    for tower, mode in tower_modes(peft).items()
  }


def check_config(peft: ml_collections.ConfigDict) -> None:
  if peft.preset not in PRESETS:
    raise ValueError(f"config.peft.preset={peft.preset!r} is not one of {sorted(PRESETS)}")
  for key in ("image", "text"):
    if peft[key] and peft[key] not in TOWER_MODES:
      raise ValueError(f"config.peft.{key}={peft[key]!r} is not one of {sorted(TOWER_MODES)}")
  if peft.adapter_reduction < 1:
    raise ValueError(f"config.peft.adapter_reduction={peft.adapter_reduction} must be >= 1")
  if peft.lora_rank < 1:
    raise ValueError(f"config.peft.lora_rank={peft.lora_rank} must be >= 1")
  try:
    re.compile(peft.train_also)
  except re.error as e:
    raise ValueError(f"config.peft.train_also={peft.train_also!r} is not a regex: {e}") from e


def _is_norm(parts: tuple[str, ...]) -> bool:
  return any(_NORM.search(p) for p in parts[:-1])


def _block_index(parts: tuple[str, ...]) -> int | None:
  for p in parts:
    if m := _BLOCK.match(p):
      return int(m.group(2))
  return None


def _tower_trains(parts: tuple[str, ...], mode: str, last_block: int) -> bool:
  """Whether `mode` trains the tower parameter at `parts` (tower name first)."""
  inner = parts[1:]
  head = inner[0] in _PROJECTIONS
  if mode in ("all", "frozen", "lora"):
    return mode == "all" or (mode == "lora" and inner[-1] in ("lora_a", "lora_b"))
  if mode == "lilt":
    return head or _is_norm(inner) or any(p.startswith("adapter") for p in inner)
  if mode == "bitfit":
    return head or inner[-1] == "bias"
  # unlock_last: the last block, and the norms after the blocks (not ln_pre / embeddings').
  block = _block_index(inner)
  final_norm = block is None and _is_norm(inner) and inner[0] not in ("ln_pre", "embeddings")
  return head or block == last_block or final_norm


def _unrolled_views(parts: tuple[str, ...], leaf: Any) -> list[tuple[str, ...]]:
  """The unrolled parameter paths a leaf at `parts` holds: itself, or resblocks_<i> for
  every block of a scanned stack (the leaf's leading axis)."""
  if STACKED_BLOCKS not in parts[:-1]:
    return [parts]
  at = parts.index(STACKED_BLOCKS)
  return [(*parts[:at], f"{STACKED_BLOCKS}_{i}", *parts[at + 1 :]) for i in range(leaf.shape[0])]


def labeler(peft: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """params -> same-structured tree of "train" / "freeze" labels (optax.multi_transform).

  The temperature trains unless both towers are "frozen" or "lora"; config.peft.train_also
  (a regex over "tower/.../leaf" paths) adds parameters to any mode.
  """
  modes = tower_modes(peft)
  extra = re.compile(peft.train_also) if peft.train_also else None
  temperature_trains = any(m not in ("frozen", "lora") for m in modes.values())

  def labels(params: Any) -> Any:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    # Each leaf as the unrolled path(s) it holds: one, or one per block of a scanned stack.
    views = [
      _unrolled_views(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat
    ]
    last = {}
    for parts in (parts for view in views for parts in view):
      if (block := _block_index(parts)) is not None:
        last[parts[0]] = max(last.get(parts[0], -1), block)

    def trains(parts: tuple[str, ...]) -> bool:
      if extra and extra.search("/".join(parts)):
        return True
      if parts[0] in modes:
        return _tower_trains(parts, modes[parts[0]], last.get(parts[0], -1))
      return temperature_trains and parts[-1] in _TEMPERATURE

    out = []
    for view in views:
      decided = {trains(parts) for parts in view}
      if len(decided) > 1:
        stacked = "/".join(view[0]).replace(f"{STACKED_BLOCKS}_0", STACKED_BLOCKS)
        raise ConfigError(
          f"config.peft trains some blocks of {stacked} and freezes others, which scanned "
          "blocks (config.model.scan_layers=True: one array for all blocks) cannot express; "
          "set config.model.scan_layers=False for this mode"
        )
      out.append(TRAIN if decided.pop() else FREEZE)
    return jax.tree.unflatten(jax.tree.structure(params), out)

  return labels


def freeze_gradients(params: Any, labels: Any) -> Any:
  """Frozen leaves behind stop_gradient: their gradients are zero and never computed."""
  return jax.tree.map(
    lambda p, label: jax.lax.stop_gradient(p) if label == FREEZE else p, params, labels
  )


def count(params: Any, param_labels: Callable[[Any], Any] | None) -> tuple[int, int]:
  """(trainable, total) parameter counts: every label but "freeze" trains; `param_labels`
  None: everything trains."""
  sizes = [p.size for p in jax.tree.leaves(params)]
  if param_labels is None:
    return sum(sizes), sum(sizes)
  trains = [label != FREEZE for label in jax.tree.leaves(param_labels(params))]
  return sum(n for n, t in zip(sizes, trains, strict=True) if t), sum(sizes)
