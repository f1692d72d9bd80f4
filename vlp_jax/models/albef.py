"""ALBEF (Li et al., 2021, "Align before Fuse"): a ViT image encoder and a BERT text
encoder whose upper layers cross-attend to the image tokens.

The parts are separate methods because ALBEF's losses run them in different
combinations: `encode_image` (tokens + unit feature), `encode_text` (the text-only lower
layers: states + unit feature), `fuse` (the upper layers over given text states and
image tokens, with each layer's information flow), `itm_logits`, `mlm_logits`.

Parameter layout (the module's params):

  visual/...                 VisionTransformer (open_clip names; timm / DeiT load via
                             weights.timm_vit); visual/proj is ALBEF's vision_proj
  text/embeddings, text/layer_<i>
                             BERT (weights.hf_bert names); layers >= fusion_layer also
                             hold cross_query, cross_key, cross_value, cross_output, cross_ln
  text/mlm_head/...          BERT's prediction head, decoder tied to the word embeddings
  text_proj                  Dense(embed_dim) on the text [CLS] (vision_proj's twin)
  itm/itm_head               2-way matching head on the fused [CLS]
  temp                       ITA temperature, init 0.07, clamped to [0.001, 0.5]

One difference from the reference code: ALBEF's vision_proj is a Linear with a bias;
ours is the image tower's bias-free `proj`, so the tower keeps open_clip's layout.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlp_jax.models import attention, layers, stacking
from vlp_jax.models.bert import ACTIVATIONS, BertEmbeddings, BertLayer
from vlp_jax.models.clip import l2_normalize, vit_options
from vlp_jax.models.config_fields import text_positions, text_vocab_size, vit_size
from vlp_jax.models.fusion import FusionLayer
from vlp_jax.models.heads import ItmHead, MlmHead
from vlp_jax.models.platform import compute_dtype
from vlp_jax.models.stacking import remat_policy_name, with_remat
from vlp_jax.models.vit import VisionTransformer

_INIT = nn.initializers.normal(0.02)  # BERT's initializer_range.


class AlbefText(nn.Module):
  """BERT with layers [0, fusion_layer) text-only and [fusion_layer, depth) fused."""

  vocab_size: int
  context_length: int  # Position embeddings held.
  width: int
  depth: int
  fusion_layer: int
  num_heads: int
  mlp_dim: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"
  remat: bool | str = "none"
  dtype: jnp.dtype = jnp.float32
  pad_id: int = 0
  attention: str = "auto"  # config.model.attention, for the self-attention of every layer.
  # BERT's hidden_dropout_prob and attention_probs_dropout_prob (ALBEF's
  # configs/config_bert.json: 0.1 each): config.model.text.dropout / attention_dropout.
  dropout: float = 0.0
  attention_dropout: float = 0.0

  def setup(self) -> None:
    if not 0 <= self.fusion_layer <= self.depth:
      raise ValueError(f"fusion_layer {self.fusion_layer} is outside [0, depth {self.depth}]")
    self.embeddings = BertEmbeddings.of(self, self.dropout)
    args = (self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps, self.dtype)
    text_cls, fusion_cls = with_remat(BertLayer, self.remat), with_remat(FusionLayer, self.remat)
    options = dict(
      attention=self.attention, dropout=self.dropout, attention_dropout=self.attention_dropout
    )
    self.text_layers = [
      text_cls(*args, **options, name=f"layer_{i}") for i in range(self.fusion_layer)
    ]
    self.fusion_layers = [
      fusion_cls(*args, **options, name=f"layer_{i}") for i in range(self.fusion_layer, self.depth)
    ]
    self.mlm_head = MlmHead(
      self.vocab_size, self.activation, self.layer_norm_eps, self.dtype, name="mlm_head"
    )

  def encode(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Embeddings and the text-only layers: (B, T, W)."""
    x = self.embeddings(tokens, jnp.zeros_like(tokens))
    for layer in self.text_layers:
      x = layer(x, mask)
    return x

  def fuse(
    self,
    states: jax.Array,
    mask: jax.Array,
    image: jax.Array,
    image_index: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """The fusion layers: (states (B, T, W), flows (depth - fusion_layer, B, T)).

    image (B, N, Wi), or (M, N, Wi) with image_index (B,): row b sees image[image_index[b]]."""
    flows = []
    for layer in self.fusion_layers:
      states, flow = layer(states, mask, image, image_index)
      flows.append(flow)
    if not flows:
      return states, jnp.zeros((0, *states.shape[:2]), jnp.float32)
    return states, jnp.stack(flows)

  def mlm_logits(self, states: jax.Array) -> jax.Array:
    """Vocabulary logits (..., V) of states (..., W)."""
    embedding = self.embeddings.variables["params"]["word_embeddings"]["embedding"]
    return self.mlm_head(states, embedding)


class AlbefModel(nn.Module):
  """ALBEF's online model (the momentum model is the same module with EMA parameters)."""

  visual: VisionTransformer
  text: AlbefText
  embed_dim: int = 256
  temperature_init: float = 0.07
  temperature_min: float = 0.001
  temperature_max: float = 0.5

  def setup(self) -> None:
    self.text_proj = nn.Dense(
      self.embed_dim, dtype=self.text.dtype, kernel_init=_INIT, name="text_proj"
    )
    self.itm = ItmHead(self.text.dtype, name="itm")
    self.temp = self.param("temp", nn.initializers.constant(self.temperature_init), ())

  def temperature(self) -> jax.Array:
    """The temperature clamped to [min, max] (ALBEF clamps the parameter before every
    step). Straight-through: the gradient is the clamped value's, so a temperature
    pushed past a bound still feels the loss and can come back."""
    clamped = jax.lax.stop_gradient(jnp.clip(self.temp, self.temperature_min, self.temperature_max))
    return clamped + (self.temp - jax.lax.stop_gradient(self.temp))  # Exact value, slope 1.

  def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 images -> (tokens (B, 1 + patches, Wi) after ln_post, unit feature (B, E))."""
    projected, aux = self.visual(images, all_tokens=True)
    return aux["tokens"], l2_normalize(projected)

  def encode_text(
    self, tokens: jax.Array, mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Token ids -> (text-only states (B, T, W), unit feature of [CLS] (B, E)).

    `mask` (B, T): attendable tokens; default: not padding. MLM passes the caption's
    own mask, since a random replacement may be the pad id."""
    if mask is None:
      mask = tokens != self.text.pad_id
    states = self.text.encode(tokens, mask)
    return states, l2_normalize(self.text_proj(states[:, 0]))

  def fuse(
    self,
    states: jax.Array,
    mask: jax.Array,
    image_tokens: jax.Array,
    image_index: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """Fusion layers over text states and image tokens: (states, flows (L, B, T)).

    With image_index (B,), text row b attends to image_tokens[image_index[b]], and the
    cross-attention keys and values are computed once per image."""
    return self.text.fuse(states, mask, image_tokens, image_index)

  def itm_logits(self, fused: jax.Array) -> jax.Array:
    """(B, 2) (not matched, matched) from the fused [CLS]."""
    return self.itm(fused[:, 0])

  def mlm_logits(self, fused: jax.Array) -> jax.Array:
    """(B, T, V) vocabulary logits of every position (or (K, V) of K gathered states)."""
    return self.text.mlm_logits(fused)

  def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
    """Every part once (initialisation, shapes)."""
    image_tokens, image_feature = self.encode_image(images)
    states, text_feature = self.encode_text(tokens)
    fused, flows = self.fuse(states, tokens != self.text.pad_id, image_tokens)
    return {
      "image": image_feature,
      "text": text_feature,
      "itm": self.itm_logits(fused),
      "mlm": self.mlm_logits(fused),
      "flows": flows,
      "temperature": self.temperature(),
    }


# The parts that have a momentum copy: both encoders (the text one with its fusion layers
# and MLM head, as ALBEF's BertForMaskedLM copy) and the projections (vision_proj is
# visual/proj). Not the ITM head or the temperature.
MOMENTUM_PARTS = ("visual", "text", "text_proj")


def create_albef_model(
  model_config: ml_collections.ConfigDict,
  albef_config: ml_collections.ConfigDict,
  vocab_size: int,
  pad_id: int,
  platform: str | None = None,
) -> AlbefModel:
  """AlbefModel from config.model (image tower, BERT text tower, embed_dim, dtype, remat)
  and config.albef (fusion_layer, temperature); ValueError naming a bad key. `platform`:
  the target mesh's (clip.create_model's)."""
  remat_policy_name(model_config.remat)
  stacking.refuse_scan_layers(model_config.get("scan_layers", False), "ALBEF's towers")
  image_cfg, text_cfg = model_config.image, model_config.text
  if text_cfg.kind != "bert":
    raise ValueError(f"config.model.text.kind={text_cfg.kind!r}: ALBEF's text encoder is 'bert'")
  size = vit_size(image_cfg)
  if not 0 <= albef_config.fusion_layer <= text_cfg.depth:
    raise ValueError(
      f"config.albef.fusion_layer={albef_config.fusion_layer} is outside [0, "
      f"config.model.text.depth={text_cfg.depth}]"
    )
  vocab_size = text_vocab_size(text_cfg, vocab_size)
  positions = text_positions(text_cfg, text_cfg.context_length)
  activation = model_config.activation
  shared = tuple(a for a in ACTIVATIONS if a in layers.ACTIVATIONS)  # Both towers know it.
  if activation not in shared:
    raise ValueError(f"config.model.activation={activation!r} is not one of {shared}")
  dtype = compute_dtype(model_config.dtype, platform)
  attention.check_attention(
    model_config.attention,
    dtype,
    {"image": size.width // size.num_heads, "text": text_cfg.width // text_cfg.num_heads},
    platform,
    attention_dropout={
      "image": image_cfg.attention_dropout,
      "text": text_cfg.attention_dropout,
    },
  )
  visual = VisionTransformer(
    size=size,
    image_size=image_cfg.image_size,
    embed_dim=model_config.embed_dim,
    activation=activation,
    remat=model_config.remat,
    dtype=dtype,
    attention=model_config.attention,
    dropout=image_cfg.dropout,  # ALBEF's ViT: none (models/vit.py's drop_rate 0).
    attention_dropout=image_cfg.attention_dropout,
    **vit_options(image_cfg),
  )
  text = AlbefText(
    vocab_size=vocab_size,
    context_length=positions,
    width=text_cfg.width,
    depth=text_cfg.depth,
    fusion_layer=albef_config.fusion_layer,
    num_heads=text_cfg.num_heads,
    mlp_dim=text_cfg.mlp_dim,
    layer_norm_eps=text_cfg.layer_norm_eps,
    activation=activation,
    remat=model_config.remat,
    dtype=dtype,
    pad_id=pad_id,
    attention=model_config.attention,
    dropout=text_cfg.dropout,
    attention_dropout=text_cfg.attention_dropout,
  )
  return AlbefModel(
    visual=visual,
    text=text,
    embed_dim=model_config.embed_dim,
    temperature_init=albef_config.temperature,
    temperature_min=albef_config.temperature_min,
    temperature_max=albef_config.temperature_max,
  )
