"""Shared machinery of the checkpoint importers: per-parameter sources, templates, hints.

An importer describes, for every parameter path of our model ("visual/conv1/kernel"), where
its value comes from in the checkpoint (a `Source`: keys and how to combine them), and
`convert` fills a parameter template from that description, checking every key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlp_jax.models.stacking import has_stacked_blocks, stack_blocks, unstack_blocks
from vlp_jax.models.vit import VIT_SIZES
from vlp_jax.weights.state_dict import (
  StateDict,
  StateDictReader,
  WeightsError,
  fill_params,
  flatten,
  read_state_dict,
  to_numpy,
  unflatten,
)

Params = dict[str, Any]

# open_clip's default head width (CLIPVisionCfg.head_width): heads leave no trace in the
# tensors, so towers whose width is not in our variant table are given width / 64 heads.
HEAD_WIDTH = 64

# Parameter-efficient additions (layers.Tuning): no external checkpoint holds them; import keeps
# their initial values (the identity), export merges LoRA and refuses adapters.
_TUNING = re.compile(r"(^|/)adapter_[^/]*/|/lora_[ab]$")


def is_tuning(path: str) -> bool:
  """Whether the parameter path is an adapter or LoRA factor (layers.Tuning)."""
  return bool(_TUNING.search(path))


def _identity(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one parameter comes from: checkpoint `keys`, combined by `combine`.

  `optional`: when the checkpoint lacks the keys, the parameter keeps the template's value
  instead of being reported missing.
  """

  keys: tuple[str, ...]
  combine: Callable[..., np.ndarray] = _identity
  optional: bool = False


def plain(key: str, optional: bool = False) -> Source:
  return Source((key,), optional=optional)


def linear(key: str) -> Source:
  """A torch Linear weight (out, in) -> our Dense kernel (in, out)."""
  return Source((key,), lambda w: w.T)


def conv(key: str) -> Source:
  """A torch Conv2d weight (out, in, h, w) -> our Conv kernel (h, w, in, out)."""
  return Source((key,), lambda w: w.transpose(2, 3, 1, 0))


def dense_or_norm(name: str, leaf: str) -> Source:
  """A leaf of our Dense (kernel, bias) or LayerNorm (scale, bias) from the torch Linear /
  LayerNorm `name`: kernel <- weight (transposed), scale <- weight, bias <- bias."""
  if leaf == "kernel":
    return linear(f"{name}.weight")
  return plain(f"{name}.{'bias' if leaf == 'bias' else 'weight'}")


def squeeze_to(key: str, shape: tuple[int, ...], optional: bool = False) -> Source:
  """A tensor with extra unit axes (timm's (1, N, D) pos_embed, a (1,) logit_scale)."""

  def combine(x: np.ndarray) -> np.ndarray:
    if x.size == int(np.prod(shape)) and x.ndim >= len(shape):
      return x.reshape(shape)
    return x  # fill_params reports the shape mismatch.

  return Source((key,), combine, optional)


def fused_qkv(q: str, k: str, v: str, kind: str) -> Source:
  """Three Linear layers (q, k, v) -> one in_proj Dense: kernel (in, 3w) or bias (3w,)."""
  if kind == "kernel":
    return Source((q, k, v), lambda *ws: np.concatenate(ws, axis=0).T)
  return Source((q, k, v), lambda *bs: np.concatenate(bs, axis=0))


def layer_norm_key(leaf: str) -> str:
  """Flax LayerNorm leaf -> torch name."""
  return {"scale": "weight", "bias": "bias"}[leaf]


def shapes_of(template: Any) -> dict[str, tuple[int, ...]]:
  """{"a/b/kernel": shape} of a parameter tree (or of its shapes)."""
  return {path: tuple(x.shape) for path, x in flatten(template).items()}


def is_abstract(tree: Any) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def init_params(
  module: nn.Module, abstract: bool = False, seed: int = 0, only: Collection[str] | None = None
) -> Params:
  """Parameters of a CLIP, VisionTransformer or TextTransformer (shapes only if abstract).

  `only`: just these parameter paths, as a flat {path: array} dict; XLA then drops the
  rest of the initialisation, which compiles in a fraction of the time.
  """
  from vlp_jax.models import CLIP, TextTransformer, VisionTransformer

  def dummy_images(visual: VisionTransformer) -> jax.Array:
    return jnp.zeros((1, visual.image_size, visual.image_size, 3), jnp.uint8)

  def dummy_tokens(context_length: int) -> jax.Array:
    return jnp.zeros((1, context_length), jnp.int32)

  if isinstance(module, CLIP):
    args = (dummy_images(module.visual), dummy_tokens(module.text.context_length))
  elif isinstance(module, VisionTransformer):
    args = (dummy_images(module),)
  elif isinstance(module, TextTransformer):
    args = (dummy_tokens(module.context_length),)
  else:
    raise TypeError(f"cannot initialise a {type(module).__name__}; pass its parameters")

  def init(rng: jax.Array) -> Params:
    params = module.init(rng, *args)["params"]
    if only is not None:
      return {path: x for path, x in flatten(params).items() if path in only}
    return params

  rng = jax.random.PRNGKey(seed)
  return jax.eval_shape(init, rng) if abstract else jax.jit(init)(rng)


def template_of(model_or_params: Any) -> tuple[Any, nn.Module | None]:
  """(parameter template, module or None): a module's template holds shapes only."""
  if isinstance(model_or_params, nn.Module):
    return init_params(model_or_params, abstract=True), model_or_params
  if isinstance(model_or_params, Mapping) and "params" in model_or_params:
    model_or_params = model_or_params["params"]  # A {"params": ...} variables dict.
  return model_or_params, None


def complete(params: Params, module: nn.Module | None) -> Params:
  """Replaces shape-only leaves (parameters the checkpoint does not hold) by the module's
  initial values; without a module they stay as the template had them."""
  if module is None or not is_abstract(params):
    return params
  flat = flatten(params)
  missing = {path for path, x in flat.items() if isinstance(x, jax.ShapeDtypeStruct)}
  initial = init_params(module, only=missing)
  return unflatten(
    {
      path: np.asarray(initial[path]) if isinstance(x, jax.ShapeDtypeStruct) else x
      for path, x in flat.items()
    }
  )


def convert(
  template: Any,
  state_dict: Mapping[str, np.ndarray],
  source_of: Callable[[str], Source | None],
  *,
  source: str,
  ignore_unused: Callable[[str], bool] = lambda key: False,
  hints: Callable[[str], list[str]] | None = None,
) -> Params:
  """`template` with every parameter read from `state_dict` as `source_of(path)` says.

  `source_of` returns None for parameters the checkpoint format never holds (they keep the
  template's values, e.g. a projection timm has no counterpart for); adapters and LoRA
  factors are always kept. Checkpoint keys for which `ignore_unused` is true may stay
  unused (logged). Any other missing, mis-shaped or unused key fails, listed by name in
  one WeightsError, followed by `hints(message)`.
  """
  reader = StateDictReader(state_dict, source)
  values: dict[str, np.ndarray | None] = {}
  kept: set[str] = set()
  for path in flatten(template):
    spec = None if is_tuning(path) else source_of(path)
    if spec is None or (spec.optional and not all(k in reader for k in spec.keys)):
      kept.add(path)
      continue
    arrays = [reader.get(k) for k in spec.keys]
    values[path] = None if any(a is None for a in arrays) else spec.combine(*arrays)
  try:
    params = fill_params(
      template, values, reader=reader, allow_missing=kept.__contains__, ignore_unused=ignore_unused
    )
  except WeightsError as e:
    extra = hints(str(e)) if hints else []
    raise WeightsError(" ".join([str(e), *extra])) from None
  ignored = reader.unused()
  if ignored:
    shown = ", ".join(ignored[:8]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 8 else "")
    logging.info("%s: not used by the model (expected): %s", source, shown)
  if kept:
    logging.info(
      "%s: %d parameters keep their initial values (%s)",
      source,
      len(kept),
      ", ".join(sorted(kept)[:8]) + (", ..." if len(kept) > 8 else ""),
    )
  return params


def clip_ignore_unused(
  parts: Collection[str], visual_prefixes: tuple[str, ...], ignored: re.Pattern[str]
) -> Callable[[str], bool]:
  """`convert`'s ignore_unused for a CLIP checkpoint read into a template holding `parts`:
  keys `ignored` matches (buffers, ...), and the keys of the parts the template does not
  take (an image tower's start with one of `visual_prefixes`; the rest is the text tower's)."""

  def ignore(key: str) -> bool:
    if ignored.search(key):
      return True
    if key.startswith(visual_prefixes):
      return "visual" not in parts
    if key in ("logit_scale", "logit_bias"):
      return key not in parts
    return "text" not in parts

  return ignore


def with_tower_root(template: Any, fn: Callable[[Any], Params]) -> Params:
  """Runs `fn` on a CLIP-rooted tree: a tower's own parameters (a VisionTransformer's, with
  conv1 at the root; a TextTransformer's, with token_embedding) go in as {"visual": ...}
  / {"text": ...}, and come back unwrapped."""
  if isinstance(template, Mapping):
    for root, marker in (("visual", "conv1"), ("text", "token_embedding")):
      if marker in template:
        return fn({root: template})[root]
  return fn(template)


def in_unrolled_layout(template: Any, fn: Callable[[Any], Params]) -> Params:
  """Runs `fn` on the unrolled view (resblocks_<i>, the layout every checkpoint format
  maps to) of `template`, and returns its result in the template's layout: stacked again
  when the template's blocks are scanned (config.model.scan_layers)."""
  params = fn(unstack_blocks(template))
  return stack_blocks(params) if has_stacked_blocks(template) else params


def as_state_dict(state_dict_or_path: str | os.PathLike | Mapping[str, Any]) -> StateDict:
  """A checkpoint path (read safely) or a state dict of NumPy arrays / torch tensors."""
  if isinstance(state_dict_or_path, str | os.PathLike):
    return read_state_dict(os.fspath(state_dict_or_path))
  return {
    k: to_numpy(v) if hasattr(v, "detach") else np.asarray(v)  # torch tensors: a live model
    for k, v in state_dict_or_path.items()
  }


def require_keys(state_dict: Mapping[str, Any], needed: tuple[str, ...], what: str) -> None:
  """A WeightsError unless `state_dict` holds every key in `needed` (a `what` checkpoint's)."""
  if any(k not in state_dict for k in needed):
    raise WeightsError(
      f"not a {what} checkpoint: it lacks one of {needed} (keys start {sorted(state_dict)[:5]})"
    )


def source_name(
  state_dict_or_path: str | os.PathLike | Mapping[str, Any], source_path: str = ""
) -> str:
  """The checkpoint's path: the one given, else `source_path` (where a state dict came from)."""
  if isinstance(state_dict_or_path, str | os.PathLike):
    return os.fspath(state_dict_or_path)
  return source_path


def json_beside(path: str, file_name: str) -> dict[str, Any]:
  """The JSON file `file_name` in the directory `path` or next to the file `path`; {} when
  there is none (or no path)."""
  if not path:
    return {}
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_file = os.path.join(directory, file_name)
  if not os.path.isfile(config_file):
    return {}
  with open(config_file) as f:
    return json.load(f)


def vit_fields(width: int, depth: int, mlp_dim: int, heads: int | None, patch: int) -> dict:
  """config.model.image's variant + overrides for these dims; heads guessed when None."""
  by_width = [n for n, s in VIT_SIZES.items() if s[0] == width]
  if heads is None:
    heads = VIT_SIZES[by_width[0]][3] if by_width else max(width // HEAD_WIDTH, 1)
  exact = [n for n in by_width if VIT_SIZES[n] == (width, depth, mlp_dim, heads)]
  name = (exact or by_width or ["B"])[0]
  base = dict(zip(("width", "depth", "mlp_dim", "num_heads"), VIT_SIZES[name], strict=True))
  fields = {"width": width, "depth": depth, "mlp_dim": mlp_dim, "num_heads": heads}
  return {
    "variant": f"{name}/{patch}",
    **{k: (v if v != base[k] else None) for k, v in fields.items()},
  }


def image_fields(
  state_dict: Mapping[str, Any],
  patch_embed: str,
  blocks: str,
  fc1: str,
  grid: int,
  *,
  heads: int | None = None,
  head_width: int | None = None,
) -> dict:
  """vit_fields + image_size for a torch-layout ViT: the patch embedding `patch_embed`
  (width, 3, patch, patch), blocks `blocks`<i>. whose first MLP layer is `fc1`, `grid`
  patches a side. Heads: `heads`, else width // `head_width`, else vit_fields' guess."""
  conv = state_dict[patch_embed]
  width, patch = int(conv.shape[0]), int(conv.shape[-1])
  if heads is None and head_width is not None:
    heads = width // head_width
  depth = count_blocks(state_dict, blocks)
  mlp_dim = int(state_dict[f"{blocks}0.{fc1}"].shape[0])
  return {**vit_fields(width, depth, mlp_dim, heads, patch), "image_size": grid * patch}


def count_blocks(state_dict: Mapping[str, Any], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
  return max(found) + 1 if found else 0
