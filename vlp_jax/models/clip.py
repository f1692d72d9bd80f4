"""Two-tower CLIP: image tower + text tower (CLIP causal or BERT) + learnable temperature."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlp_jax.models.attention import check_attention
from vlp_jax.models.bert import POOLINGS, BertTextTower
from vlp_jax.models.config_fields import text_positions, text_vocab_size, vit_size
from vlp_jax.models.layers import NO_TUNING, Tuning
from vlp_jax.models.platform import compute_dtype
from vlp_jax.models.stacking import refuse_scan_layers, remat_policy_name
from vlp_jax.models.text import PAD_ID, TextTransformer
from vlp_jax.models.vit import VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nn.Module):
  """Returns L2-normalised image and text embeddings, the clamped logit scale and, for
  the sigmoid (SigLIP) loss, a learnable logit bias."""

  visual: VisionTransformer
  text: TextTransformer | BertTextTower  # Any text tower returning (embedding, aux).
  logit_scale_init: float = math.log(1 / 0.07)
  logit_scale_max: float = math.log(100.0)
  logit_bias_init: float | None = None  # SigLIP: -10; None: no bias parameter.

  def setup(self) -> None:
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(self.logit_scale_init), ()
    )
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), ())

  def temperature(self) -> dict[str, jax.Array]:
    """{"logit_scale": exp of the clamped parameter[, "logit_bias": ...]}."""
    # Clamp in the forward pass (open_clip clamps the parameter after each step): the
    # same cap on the temperature, without model-specific code in the train step.
    out = {"logit_scale": jnp.exp(jnp.minimum(self.logit_scale, self.logit_scale_max))}
    if self.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias
    return out

  def encode_image(self, images: jax.Array, keep_indices: jax.Array | None = None) -> jax.Array:
    return l2_normalize(self.visual(images, keep_indices)[0])

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    return l2_normalize(self.text(tokens)[0])

  def __call__(
    self, images: jax.Array, tokens: jax.Array, keep_indices: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    return {
      "image": self.encode_image(images, keep_indices),
      "text": self.encode_text(tokens),
      **self.temperature(),
    }


def embedding_fns(model: CLIP) -> dict[str, Callable[[Any, jax.Array], jax.Array]]:
  """{"embed_image": (params, uint8 images) -> unit embeddings, "embed_text": (params,
  tokens) -> unit embeddings}: the prediction functions evaluation uses."""

  def embed_image(params: Any, images: jax.Array) -> jax.Array:
    return model.apply({"params": params}, images, method=CLIP.encode_image)

  def embed_text(params: Any, tokens: jax.Array) -> jax.Array:
    return model.apply({"params": params}, tokens, method=CLIP.encode_text)

  return {"embed_image": embed_image, "embed_text": embed_text}


def vit_options(image_cfg: ml_collections.ConfigDict) -> dict[str, object]:
  """VisionTransformer's timm / MAE options from config.model.image (absent keys: defaults)."""
  options = {
    key: image_cfg[key]
    for key in ("layer_norm_eps", "patch_bias", "pre_norm", "pool")
    if image_cfg.get(key) is not None
  }
  for key in ("mean", "std"):  # None: CLIP's. [0, 1] units in the config, [0, 255] in the model.
    if image_cfg.get(key) is not None:
      options[key] = tuple(float(v) * 255 for v in image_cfg[key])
  return options


def create_model(
  model_config: ml_collections.ConfigDict,
  vocab_size: int,
  pad_id: int = PAD_ID,
  loss_kind: str = "clip",
  tuning: Mapping[str, Tuning] | None = None,
  platform: str | None = None,
) -> CLIP:
  """Builds CLIP from `config.model`; `vocab_size` and `pad_id` come from the tokenizer,
  `loss_kind` (config.loss.kind) picks the temperature's initialisation, `tuning`
  ({"visual": ..., "text": ...}, peft.tuning_from_config) adds adapters / LoRA factors.
  `platform`: the target mesh's (MethodContext.platform; default this process's devices),
  which resolves config.model.dtype "auto" and checks config.model.attention."""
  tuning = tuning or {}
  dtype = compute_dtype(model_config.dtype, platform)
  remat_policy_name(model_config.remat)  # Fails here, naming the key, not inside jit.
  image_cfg, text_cfg = model_config.image, model_config.text
  for tower in ("image", "text"):
    for key in ("dropout", "attention_dropout"):
      if model_config[tower][key]:
        # Refused rather than ignored: the CLIP-style methods pass no dropout rng.
        raise ValueError(
          f"config.model.{tower}.{key}={model_config[tower][key]}: CLIP's towers train "
          "without dropout (open_clip's default); ALBEF, CMask and VLC apply it"
        )
  size = vit_size(image_cfg)
  head_dims = {
    "image": size.width // size.num_heads,
    "text": text_cfg.width // text_cfg.num_heads,
  }
  check_attention(model_config.attention, dtype, head_dims, platform)
  visual = VisionTransformer(
    size=size,
    image_size=image_cfg.image_size,
    embed_dim=model_config.embed_dim,
    activation=model_config.activation,
    remat=model_config.remat,
    dtype=dtype,
    tuning=tuning.get("visual", NO_TUNING),
    attention=model_config.attention,
    scan_layers=model_config.scan_layers,
    **vit_options(image_cfg),
  )
  text = _text_tower(model_config, vocab_size, pad_id, dtype, tuning.get("text", NO_TUNING))
  if loss_kind == "siglip":  # The SigLIP paper's initialisation: t = 10, b = -10.
    return CLIP(visual=visual, text=text, logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
  return CLIP(visual=visual, text=text)


def _text_tower(
  model_config: ml_collections.ConfigDict,
  vocab_size: int,
  pad_id: int,
  dtype: jnp.dtype,
  tuning: Tuning,
) -> TextTransformer | BertTextTower:
  """config.model.text's tower: CLIP's causal transformer or a BERT encoder."""
  text_cfg = model_config.text
  common = dict(
    vocab_size=text_vocab_size(text_cfg, vocab_size),
    width=text_cfg.width,
    depth=text_cfg.depth,
    num_heads=text_cfg.num_heads,
    mlp_dim=text_cfg.mlp_dim,
    embed_dim=model_config.embed_dim,
    remat=model_config.remat,
    dtype=dtype,
    tuning=tuning,
    pad_id=pad_id,
    attention=model_config.attention,
  )
  if text_cfg.kind == "clip":
    return TextTransformer(
      context_length=text_cfg.context_length,
      activation=model_config.activation,
      scan_layers=model_config.scan_layers,
      **common,
    )
  if text_cfg.kind == "bert":
    refuse_scan_layers(model_config.scan_layers, "BERT text towers")
    if text_cfg.pooling not in POOLINGS:
      raise ValueError(f"config.model.text.pooling={text_cfg.pooling!r} is not one of {POOLINGS}")
    return BertTextTower(
      context_length=text_positions(text_cfg, text_cfg.context_length),
      pooling=text_cfg.pooling,
      layer_norm_eps=text_cfg.layer_norm_eps,
      **common,
    )
  raise ValueError(f"config.model.text.kind={text_cfg.kind!r} is not one of ('clip', 'bert')")
