"""timm VisionTransformer and MAE encoder checkpoints -> our image tower.

Name map (ours <- timm): conv1 <- patch_embed.proj (with bias), class_embedding <-
cls_token, positional_embedding <- pos_embed, ln_pre <- norm_pre (CLIP-style timm models
only), resblocks_<i> <- blocks.<i> (ln_1/ln_2 <- norm1/norm2, attn/in_proj <- attn.qkv,
attn/out_proj <- attn.proj, mlp/c_fc/c_proj <- mlp.fc1/fc2), ln_post <- norm, or fc_norm
for models that average the patch tokens (timm's global_pool="avg", MAE fine-tuning).

The model must be built to match (config_from_timm says how): layer_norm_eps=1e-6 (timm's
default), patch_bias=True, pre_norm=False, pool="mean" with fc_norm checkpoints. timm has
no joint-space projection: visual/proj keeps its initial value. The classifier (head.*),
MAE's decoder (decoder_*, mask_token) and its {"model": ...} container are not used
(`import_mae_into_vlc` reads encoder and decoder into VLC's single-stream model).
Models with parts we do not have (register tokens, LayerScale, qk-norm) fail, naming them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from vlp_jax.models.single_stream import sincos_positions
from vlp_jax.weights import mapping
from vlp_jax.weights.mapping import Params, Source
from vlp_jax.weights.state_dict import WeightsError

# Checkpoint keys of parts our image tower does not have, left unused on purpose.
_IGNORED = re.compile(r"^(head\.|head_drop|decoder_|mask_token$)")

_BLOCK_NAMES = {
  "ln_1": "norm1",
  "ln_2": "norm2",
  "in_proj": "attn.qkv",
  "out_proj": "attn.proj",
  "c_fc": "mlp.fc1",
  "c_proj": "mlp.fc2",
}

# ImageNet's RGB statistics in [0, 1] units, timm's and MAE's default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _positional_embedding(shape: tuple[int, ...]) -> Source:
  """pos_embed (1, N [+ 1], D) -> (N + 1, D); a zero class-token row is prepended for
  models whose class token has no position embedding (timm's no_embed_class)."""

  def combine(pos: np.ndarray) -> np.ndarray:
    pos = pos.reshape(pos.shape[-2:]) if pos.ndim == 3 else pos
    if pos.shape[0] + 1 == shape[0]:
      pos = np.concatenate([np.zeros_like(pos[:1]), pos])
    return pos

  return Source(("pos_embed",), combine)


def _embedding_source(rest: str, shape: tuple[int, ...]) -> Source | None:
  """timm's patch embedding and class token for our ViT's conv1 / class_embedding (the
  image tower's and VLC's encoder's); None for any other parameter."""
  if rest == "conv1/kernel":
    return mapping.conv("patch_embed.proj.weight")
  if rest == "conv1/bias":
    return mapping.plain("patch_embed.proj.bias")
  if rest == "class_embedding":
    return mapping.squeeze_to("cls_token", shape)
  return None


def _source_of(state_dict: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]):
  post_norm = "fc_norm" if "fc_norm.weight" in state_dict else "norm"

  def source_of(path: str) -> Source | None:
    if not path.startswith("visual/"):
      return None  # text tower, logit_scale: not in a timm checkpoint.
    rest = path[len("visual/") :]
    if rest == "proj":
      return None  # No projection in timm: keeps its initial value.
    if (embedding := _embedding_source(rest, shapes.get(path, ()))) is not None:
      return embedding
    if rest == "positional_embedding":
      return _positional_embedding(shapes[path])
    norm, _, leaf = rest.rpartition("/")
    if norm in ("ln_pre", "ln_post"):
      name = "norm_pre" if norm == "ln_pre" else post_norm
      return mapping.plain(f"{name}.{mapping.layer_norm_key(leaf)}")
    return _block_source(path, rest, "blocks")

  return source_of


def _block_source(path: str, rest: str, prefix: str) -> Source:
  """transformer/resblocks_<i>/... of our tower <- `prefix`.<i>.... of timm / MAE."""
  m = re.fullmatch(r"transformer/resblocks_(\d+)/(?:attn/|mlp/)?(\w+)/(kernel|bias|scale)", rest)
  if not m:
    raise WeightsError(f"parameter {path!r} has no timm counterpart")
  block, module, leaf = m.groups()
  return mapping.dense_or_norm(f"{prefix}.{block}.{_BLOCK_NAMES[module]}", leaf)


def _hints(message: str) -> list[str]:
  out = []
  if "patch_embed.proj.bias" in message or "visual/conv1/bias" in message:
    out.append("(config.model.image.patch_bias must be True exactly when the checkpoint has one)")
  if "norm_pre" in message:
    out.append("(config.model.image.pre_norm must be True exactly when it has norm_pre)")
  if "fc_norm" in message:
    out.append('(fc_norm checkpoints average the patch tokens: config.model.image.pool="mean")')
  if "shape" in message:
    out.append("(config_from_timm(checkpoint) gives the config.model.image fields)")
  return out


def _checked(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """`state_dict` if it is a timm / MAE ViT with a class token, else a WeightsError."""
  needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
  mapping.require_keys(state_dict, needed, "timm / MAE ViT")
  if "cls_token" not in state_dict:
    raise WeightsError("the checkpoint has no cls_token; our ViT needs a class token")
  return state_dict


def import_timm_vit(
  state_dict_or_path: str | os.PathLike | Mapping[str, Any],
  model_or_params_template: Any,
  *,
  pool: str | None = None,
) -> Params:
  """Our image tower's parameters from a timm VisionTransformer or MAE checkpoint.

  `model_or_params_template`: our CLIP or VisionTransformer module, or their parameters
  (or any tree holding {"visual": ...}); only the image tower is filled, the rest (and
  visual/proj) keep the template's values. `pool`: the model's pooling ("cls" or "mean"),
  taken from a module when one is passed; checked against the checkpoint (fc_norm ->
  "mean"). Returns the whole template with the image tower replaced (or the tower's
  parameters, for a VisionTransformer template).
  """
  state_dict = _checked(mapping.as_state_dict(state_dict_or_path))
  template, module = mapping.template_of(model_or_params_template)
  if module is not None:
    pool = getattr(module, "visual", module).pool
  if pool is not None:
    wanted = "mean" if "fc_norm.weight" in state_dict else "cls"
    if pool != wanted:
      raise WeightsError(
        f"the checkpoint {'has' if wanted == 'mean' else 'has no'} fc_norm, so its features "
        f"are the {'mean of the patch tokens' if wanted == 'mean' else 'class token'}: "
        f'build the model with pool="{wanted}" (config.model.image.pool), not {pool!r}'
      )

  def run(template: Any) -> Params:
    if "visual" not in template:
      raise WeightsError("the template has no image tower (params['visual'])")
    return mapping.convert(
      template,
      state_dict,
      _source_of(state_dict, mapping.shapes_of(template)),
      source="timm checkpoint",
      ignore_unused=lambda key: bool(_IGNORED.match(key)),
      hints=_hints,
    )

  params = mapping.in_unrolled_layout(template, lambda t: mapping.with_tower_root(t, run))
  return mapping.complete(params, module)


def config_from_timm(
  state_dict_or_path: str | os.PathLike | Mapping[str, Any],
  *,
  num_heads: int | None = None,
  layer_norm_eps: float = 1e-6,
) -> dict[str, Any]:
  """config.model fields for a timm / MAE ViT: {"activation": "gelu", "image": {variant,
  image_size, width, depth, mlp_dim, num_heads, layer_norm_eps, patch_bias, pre_norm,
  pool, mean, std}}. Heads: our variant table's for the width (timm's Ti/S/B/L/H agree),
  else width / 64, or `num_heads`. The epsilon (timm: 1e-6; its CLIP ports: 1e-5) and the
  pixel statistics (ImageNet's here; some models use 0.5) are not in the tensors: check
  the model's timm pretrained_cfg."""
  state_dict = _checked(mapping.as_state_dict(state_dict_or_path))
  rows = int(np.prod(state_dict["pos_embed"].shape[:-1]))
  grid = round((rows - 1) ** 0.5)
  if grid * grid != rows - 1:  # No class-token position (no_embed_class).
    grid = round(rows**0.5)
  image = {
    **mapping.image_fields(
      state_dict, "patch_embed.proj.weight", "blocks.", "mlp.fc1.weight", grid, heads=num_heads
    ),
    "layer_norm_eps": layer_norm_eps,
    "patch_bias": "patch_embed.proj.bias" in state_dict,
    "pre_norm": "norm_pre.weight" in state_dict,
    "pool": "mean" if "fc_norm.weight" in state_dict else "cls",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
  }
  return {"activation": "gelu", "image": image}


# ---------------------------------------------------------------- MAE -> VLC

# Fixed sin-cos tables in MAE's checkpoints: VLC recomputes them for its own grid.
_VLC_IGNORED = re.compile(r"^(head\.|head_drop|pos_embed$|decoder_pos_embed$)")


def _vlc_source_of(state_dict: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]):
  has_decoder = "decoder_embed.weight" in state_dict

  def source_of(path: str) -> Source | None:
    part, _, rest = path.partition("/")
    if part == "encoder":
      if (embedding := _embedding_source(rest, shapes.get(path, ()))) is not None:
        return embedding
      if rest.startswith("ln_post/"):
        # Every token goes through MAE's final norm (not fc_norm, a classifier's).
        return mapping.plain(f"norm.{mapping.layer_norm_key(rest.rpartition('/')[2])}")
      if rest.startswith("transformer/"):
        return _block_source(path, rest, "blocks")
      return None  # Text and token-type embeddings: not in an image checkpoint.
    if part == "decoder" and has_decoder:
      names = {"embed": "decoder_embed", "pred": "decoder_pred", "ln": "decoder_norm"}
      module, _, leaf = rest.partition("/")
      if module in names:
        return mapping.dense_or_norm(names[module], leaf)
      if rest == "mask_token":
        return mapping.squeeze_to("mask_token", shapes[path])
      return _block_source(path, rest, "decoder_blocks")
    return None  # No decoder in the checkpoint, pooler, ITM / MLM heads: initial values.

  return source_of


def _check_sincos(state_dict: Mapping[str, Any], key: str, table: np.ndarray) -> None:
  """Warns when a checkpoint's positions on our grid are not MAE's fixed sin-cos ones
  (a timm ViT with learned positions): VLC uses sin-cos whatever the checkpoint holds."""
  if key not in state_dict:
    return
  pos = np.asarray(state_dict[key], np.float32)
  pos = pos.reshape(-1, pos.shape[-1])  # Another width: fill_params reports the decoder.
  if pos.shape == table.shape and not np.allclose(pos, table, atol=1e-4):
    logging.warning(
      "%s is not MAE's fixed sin-cos table: VLC uses sin-cos positions, these are dropped", key
    )


def import_mae_into_vlc(
  state_dict_or_path: str | os.PathLike | Mapping[str, Any], params: Params
) -> Params:
  """VLC's parameters (models.single_stream.SingleStream, host arrays) with the encoder
  and the MAE decoder read from an MAE pretraining checkpoint (or, without decoder_*
  keys, a timm ViT: the decoder keeps its initial values).

  Names (ours <- MAE): encoder/conv1 <- patch_embed.proj, encoder/class_embedding <-
  cls_token, encoder/transformer/resblocks_<i> <- blocks.<i>, encoder/ln_post <- norm,
  decoder/embed <- decoder_embed, decoder/mask_token <- mask_token,
  decoder/transformer/resblocks_<i> <- decoder_blocks.<i>, decoder/ln <- decoder_norm,
  decoder/pred <- decoder_pred. pos_embed / decoder_pos_embed are MAE's fixed sin-cos
  tables: recomputed for our grid (so a 224 px checkpoint serves 384 px), not read. Text
  embeddings, token types, pooler and heads keep their values.
  """
  state_dict = _checked(mapping.as_state_dict(state_dict_or_path))
  if "encoder" not in params or "decoder" not in params:
    raise WeightsError("the parameters are not a VLC model's (no encoder / decoder)")
  shapes = mapping.shapes_of(params)
  # The checkpoint's own grid (its resolution may differ from ours).
  grid = round((int(np.prod(state_dict["pos_embed"].shape[:-1])) - 1) ** 0.5)
  _check_sincos(
    state_dict, "pos_embed", sincos_positions(shapes["encoder/class_embedding"][0], grid)
  )
  if "decoder_pos_embed" in state_dict and "decoder/mask_token" in shapes:
    table = sincos_positions(shapes["decoder/mask_token"][0], grid)
    _check_sincos(state_dict, "decoder_pos_embed", table)
  return mapping.convert(
    params,
    state_dict,
    _vlc_source_of(state_dict, shapes),
    source="MAE checkpoint",
    ignore_unused=lambda key: bool(_VLC_IGNORED.match(key)),
    hints=_hints,
  )
