"""The trainer's loader of pretrained values: one part of the model (or all of it) from a
converted directory, a training run or a raw open_clip / Hugging Face / timm checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from vlp_jax.models.stacking import unstack_blocks
from vlp_jax.weights import convert, mapping
from vlp_jax.weights.mapping import Params
from vlp_jax.weights.state_dict import (
  StateDictReader,
  WeightsError,
  fill_params,
  flatten,
  read_state_dict,
)

# load_tower_params kinds -> the top-level parameter entries they replace.
KINDS = {"model": None, "image": ("visual",), "text": ("text",)}


def load_tower_params(kind: str, path: str, template: Params, *, source: str = "auto") -> Params:
  """`template` (our CLIP's parameters) with one part replaced by pretrained values.

  kind: "model" (every part the checkpoint has: a timm / MAE checkpoint only has the
  image tower), "image" (params["visual"]) or "text" (params["text"]). path: a directory
  written by weights.convert, a training run's workdir (its newest checkpoint), or a raw checkpoint: an open_clip, Hugging Face
  CLIPModel or timm / MAE ViT file or model directory (`source` "auto" detects which).
  Adapters / LoRA factors, parameters the source never has (timm: visual/proj, text
  tower) and, for "image" / "text", everything outside that part keep the template's
  values; every other missing, mis-shaped or unused parameter raises a WeightsError that
  names them. Returns a new tree: NumPy arrays where loaded, the template's leaves
  elsewhere (place it with jax.device_put and the state's shardings), in the template's
  block layout (scanned or not, config.model.scan_layers) whatever the source's.
  """
  if kind not in KINDS:
    raise ValueError(f"kind {kind!r} is not one of {tuple(KINDS)}")
  if isinstance(template, Mapping) and "params" in template and len(template) == 1:
    template = template["params"]
  return mapping.in_unrolled_layout(
    template, lambda unrolled: _load_tower_params(kind, path, unrolled, source)
  )


def _load_tower_params(kind: str, path: str, template: Params, source: str) -> Params:
  parts = KINDS[kind] or tuple(template)
  missing = [p for p in parts if p not in template]
  if missing:
    raise WeightsError(f"the model has no {missing} to load into (kind={kind!r})")
  if os.path.isfile(os.path.join(path, convert.INFO_FILE)) or convert.run_checkpoint_dir(path):
    saved, info = convert.read_params(path)
    saved = unstack_blocks(saved)  # A run trained with config.model.scan_layers.
    if kind == "model":  # The parts the checkpoint has (+ SigLIP's logit_bias, see below).
      parts = tuple(p for p in template if p in saved or p == "logit_bias")
      if left := sorted(set(template) - set(parts)):
        logging.info("%s has no %s: they keep the template's values", path, left)
    sub = {p: template[p] for p in parts}
    loaded = _fill_from_tree(sub, saved, info, path=path, whole=kind == "model")
  else:
    sub = {p: template[p] for p in parts}
    state_dict = read_state_dict(path)
    found = convert.detect_source(state_dict) if source == "auto" else source
    loaded = convert.import_checkpoint(found, state_dict, sub)
    logging.info("Loaded %s from the %s checkpoint %s", "/".join(parts), found, path)
  return {**template, **loaded}


def load_pretrained(path: str, template: Params, *, source: str = "auto") -> Params:
  """load_tower_params("model", path, template): the whole model's pretrained values."""
  return load_tower_params("model", path, template, source=source)


def _fill_from_tree(
  template: Params, saved: Params, info: Mapping[str, Any], *, path: str, whole: bool
) -> Params:
  """`template` with each parameter taken from the same path of `saved` (ours)."""
  flat_saved = flatten(saved)
  reader = StateDictReader(flat_saved, f"checkpoint {path}")
  # Parameters the source did not have; logit_bias: a SigLIP model from a CLIP checkpoint.
  new_params = {*info.get("new_params", ()), "logit_bias"}
  parts = set(template)
  values = {}
  for key in flatten(template):
    # Adapters / LoRA factors load when the checkpoint has them (a PEFT run), else stay.
    if key not in flat_saved and (mapping.is_tuning(key) or key in new_params):
      continue
    values[key] = reader.get(key)

  def ignore(key: str) -> bool:  # Parts of the checkpoint this kind does not load.
    return not whole and key.split("/")[0] not in parts

  params = fill_params(
    template,
    values,
    reader=reader,
    allow_missing=lambda key: mapping.is_tuning(key) or key in new_params,
    ignore_unused=ignore,
  )
  logging.info("Loaded %s from %s", "/".join(sorted(parts)), path)
  return params
