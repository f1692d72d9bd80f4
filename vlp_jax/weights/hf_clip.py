"""Hugging Face transformers CLIPModel -> vlp_jax CLIP parameters.

Name map (ours <- theirs): visual/conv1 <- vision_model.embeddings.patch_embedding,
class_embedding, positional_embedding <- position_embedding.weight, ln_pre <- pre_layrnorm
(sic), resblocks_<i> <- encoder.layers.<i> (ln_1/ln_2 <- layer_norm1/2, attn/in_proj <-
self_attn.q_proj, k_proj, v_proj fused in that order, attn/out_proj, mlp/c_fc/c_proj <-
mlp.fc1/fc2), ln_post <- post_layernorm, proj <- visual_projection (a bias-free Linear,
transposed); text/token_embedding, positional_embedding, ln_final <- final_layer_norm,
text_projection <- text_projection (Linear, transposed); logit_scale.

Pooling: Hugging Face's text tower pools the first `eos_token_id` (or, for configs with
eos_token_id == 2, the argmax id); ours the last non-pad token. They agree for CLIP's BPE,
whose end-of-text token is the largest id and is followed only by padding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from vlp_jax.weights import mapping
from vlp_jax.weights.mapping import Params, Source
from vlp_jax.weights.state_dict import WeightsError

# Buffers some versions saved.
_IGNORED = re.compile(r"\.position_ids$")

_TOWERS = {"visual": "vision_model.", "text": "text_model."}
_BLOCK_NAMES = {
  "ln_1": "layer_norm1",
  "ln_2": "layer_norm2",
  "out_proj": "self_attn.out_proj",
  "c_fc": "mlp.fc1",
  "c_proj": "mlp.fc2",
}
_TOP = {
  "visual/conv1/kernel": mapping.conv("vision_model.embeddings.patch_embedding.weight"),
  "visual/class_embedding": mapping.plain("vision_model.embeddings.class_embedding"),
  "visual/positional_embedding": mapping.plain("vision_model.embeddings.position_embedding.weight"),
  "visual/proj": mapping.linear("visual_projection.weight"),
  "text/token_embedding/embedding": mapping.plain("text_model.embeddings.token_embedding.weight"),
  "text/positional_embedding": mapping.plain("text_model.embeddings.position_embedding.weight"),
  "text/text_projection": mapping.linear("text_projection.weight"),
}
_NORMS = {
  "visual/ln_pre": "vision_model.pre_layrnorm",
  "visual/ln_post": "vision_model.post_layernorm",
  "text/ln_final": "text_model.final_layer_norm",
}


def _source_of(shapes: Mapping[str, tuple[int, ...]]):
  def source_of(path: str) -> Source | None:
    if path in _TOP:
      return _TOP[path]
    if path in ("logit_scale", "logit_bias"):  # HF CLIP has no logit_bias: keep the template's.
      return mapping.squeeze_to(path, shapes[path], optional=path == "logit_bias")
    norm, _, leaf = path.rpartition("/")
    if norm in _NORMS:
      return mapping.plain(f"{_NORMS[norm]}.{mapping.layer_norm_key(leaf)}")
    m = re.fullmatch(r"(visual|text)/transformer/resblocks_(\d+)/(.+)/(kernel|bias|scale)", path)
    if not m:
      raise WeightsError(f"parameter {path!r} has no Hugging Face CLIP counterpart")
    tower, block, module, leaf = m.groups()
    prefix = f"{_TOWERS[tower]}encoder.layers.{block}."
    if module == "attn/in_proj":
      q, k, v = (
        f"{prefix}self_attn.{n}_proj.{'weight' if leaf == 'kernel' else 'bias'}" for n in "qkv"
      )
      return mapping.fused_qkv(q, k, v, leaf)
    name = prefix + _BLOCK_NAMES[module.rpartition("/")[2]]
    return mapping.dense_or_norm(name, leaf)

  return source_of


def _checked(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """`state_dict` if it is a Hugging Face CLIPModel's, else a WeightsError."""
  needed = (
    "vision_model.embeddings.patch_embedding.weight",
    "text_model.embeddings.token_embedding.weight",
    "visual_projection.weight",
  )
  mapping.require_keys(state_dict, needed, "Hugging Face CLIPModel")
  return state_dict


def import_hf_clip(
  state_dict_or_path: str | os.PathLike | Mapping[str, Any], model_or_params_template: Any
) -> Params:
  """Our CLIP parameters from a Hugging Face CLIPModel checkpoint (model directory,
  model.safetensors / pytorch_model.bin, or a state dict). Templates as for
  open_clip.import_open_clip (a part of the model takes that part only)."""
  state_dict = _checked(mapping.as_state_dict(state_dict_or_path))
  template, module = mapping.template_of(model_or_params_template)

  def run(template: Any) -> Params:
    return mapping.convert(
      template,
      state_dict,
      _source_of(mapping.shapes_of(template)),
      source="Hugging Face CLIP checkpoint",
      ignore_unused=mapping.clip_ignore_unused(
        set(template), ("vision_model.", "visual_projection."), _IGNORED
      ),
    )

  params = mapping.in_unrolled_layout(template, lambda t: mapping.with_tower_root(t, run))
  return mapping.complete(params, module)


_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def config_from_hf_clip(
  state_dict_or_path: str | os.PathLike | Mapping[str, Any],
  activation: str | None = None,
  *,
  hf_config: Mapping[str, Any] | None = None,
  source_path: str = "",
) -> dict[str, Any]:
  """Our config.model fields (as open_clip.config_from_open_clip) for a Hugging Face CLIP
  checkpoint. Head counts and the activation come from `hf_config` (config.json's
  contents, CLIPConfig.to_dict()) or a model directory's config.json; without one, heads
  are width / 64 and the activation is `activation` or quick_gelu (CLIPConfig's default,
  which OpenAI's checkpoints use). `source_path`: where an already read state dict came
  from (for its directory's config.json)."""
  if hf_config is None:
    hf_config = mapping.json_beside(
      mapping.source_name(state_dict_or_path, source_path), "config.json"
    )
  vision_cfg, text_cfg = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
  state_dict = _checked(mapping.as_state_dict(state_dict_or_path))
  num_patches = state_dict["vision_model.embeddings.position_embedding.weight"].shape[0] - 1
  image = mapping.image_fields(
    state_dict,
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.encoder.layers.",
    "mlp.fc1.weight",
    round(num_patches**0.5),
    heads=vision_cfg.get("num_attention_heads"),
  )
  token_embedding = state_dict["text_model.embeddings.token_embedding.weight"]
  text_width = int(token_embedding.shape[1])
  text = {
    "vocab_size": int(token_embedding.shape[0]),
    "context_length": int(state_dict["text_model.embeddings.position_embedding.weight"].shape[0]),
    "width": text_width,
    "depth": mapping.count_blocks(state_dict, "text_model.encoder.layers."),
    "num_heads": int(text_cfg.get("num_attention_heads", max(text_width // mapping.HEAD_WIDTH, 1))),
    "mlp_dim": int(state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
  }
  if activation is None:
    acts = {vision_cfg.get("hidden_act", "quick_gelu"), text_cfg.get("hidden_act", "quick_gelu")}
    if len(acts) > 1 or not acts <= set(_ACTIVATIONS):
      raise WeightsError(
        f"the towers' hidden_act {sorted(acts)} is not one activation out of {sorted(_ACTIVATIONS)}"
      )
    activation = _ACTIVATIONS[acts.pop()]
  for tower, cfg in (("vision", vision_cfg), ("text", text_cfg)):
    eps = cfg.get("layer_norm_eps", 1e-5)
    if eps != 1e-5 and tower == "text":
      raise WeightsError(f"text_config.layer_norm_eps={eps}: our text tower uses 1e-5")
    if eps != 1e-5:
      image["layer_norm_eps"] = eps
  return {
    "embed_dim": int(state_dict["visual_projection.weight"].shape[0]),
    "activation": activation,
    "image": image,
    "text": text,
  }
