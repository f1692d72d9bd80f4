"""VLC pretraining ("Training Vision-language Transformers from Captions Alone"): one
single-stream transformer (models.single_stream) trained with MLM + MAE + ITM.

One step, as the reference code does it:
1. MLM + MAE pass: whole-word masked text (15% of words, BERT's 80/10/10 over their
   pieces, special tokens never) with 60% of the patches dropped (only the visible ones
   enter the encoder; a static count). MLM cross-entropy on the selected tokens; the
   decoder reconstructs every patch from the fused image tokens, MSE on per-patch
   normalised pixels over the dropped patches only (MAE's norm_pix_loss).
2. ITM pass (a second pass, as VLC and ViLT: its text is not masked): half the rows keep
   their image, the other half get another row's image, masked with a fresh draw; a
   2-way head on the pooled state. Word-patch alignment on the same pass (ViLT's inexact
   optimal transport between text and patch states, weight 0.1): on, as in VLC's
   pretraining, unless config.vlc.wpa is False.
Both passes run as one encoder call over 2B rows (one program, bigger matmuls).
Loss weights come from config.vlc. Predictions for evaluation: "match_image" and
"match_score" (ITM re-ranking, the names ALBEF uses); a single-stream model has no
separate image or text embeddings, so it provides no embed_image / embed_text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlp_jax import losses, optim, pretrained
from vlp_jax.config_lib import ConfigBlock, ConfigError, at_least, in_range
from vlp_jax.input_pipeline.pipeline import RowExtension, WithWordIds
from vlp_jax.masking import random as random_masking
from vlp_jax.masking import text as text_masking
from vlp_jax.methods.base import (
  Batch,
  DataContext,
  Extra,
  Method,
  MethodContext,
  Metrics,
  Params,
  PredictFn,
  dropout_rngs,
)
from vlp_jax.methods.vlc_losses import itm_pairs, mae_loss, optimal_transport_distance
from vlp_jax.models.config_fields import text_positions, vit_size
from vlp_jax.models.platform import compute_dtype
from vlp_jax.models.single_stream import MaeDecoder, SingleStream, SingleStreamEncoder
from vlp_jax.models.stacking import refuse_scan_layers
from vlp_jax.models.vit import CLIP_MEAN, CLIP_STD, normalize_pixels, patchify

# ---------------------------------------------------------------- layer-wise lr decay

LAYERWISE = "layerwise"  # The one optimizer group of layerwise_lr_decay_labels.


def _layer_id(path: tuple[str, ...], depth: int) -> int:
  """0: embeddings; i + 1: encoder block i; depth + 1: the rest (final norm, pooler,
  heads, decoder), as MAE / BEiT's param_groups_lrd."""
  if path[:1] == ("encoder",):
    if path[1] in ("text_embed", "token_type_embedding", "conv1", "class_embedding"):
      return 0
    if path[1] == "transformer":
      return int(path[2].rpartition("_")[2]) + 1
  return depth + 1


def _paths(tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
    lambda path, _: tuple(str(getattr(k, "key", k)) for k in path), tree
  )


def layerwise_lr_decay_labels(params: Params, depth: int, decay: float) -> tuple[Any, Any]:
  """(labels, scales) for a SingleStream's parameters: every label is LAYERWISE (one
  group, so global-norm clipping still sees every gradient) and `scales` holds each
  parameter's learning-rate multiplier decay ** (depth + 1 - layer) (layer 0 the
  embeddings, i + 1 encoder block i, depth + 1 everything above: multiplier 1)."""
  ids = jax.tree.map(
    lambda path: _layer_id(path, depth),
    _paths(params),
    is_leaf=lambda x: type(x) is tuple,  # Not optax's NamedTuple leaves.
  )
  scales = jax.tree.map(lambda i: float(decay ** (depth + 1 - i)), ids)
  return jax.tree.map(lambda _: LAYERWISE, ids), scales


def layerwise_lr_decay_transforms(
  optim_config: ml_collections.ConfigDict, schedule: optax.Schedule, depth: int, decay: float
) -> dict[str, optax.GradientTransformation]:
  """{LAYERWISE: global-norm clipping -> AdamW (config.optim, `schedule`) -> each update
  times its layer's multiplier}: AdamW's update (weight decay included) is proportional
  to the learning rate, so this is a per-layer learning rate, as torch parameter groups
  with an lr scale (MAE fine-tuning, VLC's downstream tasks)."""

  def scale_by_layer() -> optax.GradientTransformation:
    def update(updates, state, params=None):
      del params
      _, scales = layerwise_lr_decay_labels(updates, depth, decay)
      return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)

  return {
    LAYERWISE: optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip_norm),
      optax.adamw(
        schedule,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        weight_decay=optim_config.weight_decay,
        mask=optim.decay_mask,
      ),
      scale_by_layer(),
    )
  }


# ---------------------------------------------------------------- the method


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
  """(B, ...) x 2 -> (2B, ...) with rows a0, b0, a1, b1...: a batch-sharded input stays
  on its devices (device k holds its rows of both)."""
  return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """_interleave's inverse."""
  x = x.reshape(-1, 2, *x.shape[1:])
  return x[:, 0], x[:, 1]


@dataclasses.dataclass(frozen=True)
class Vlc(Method):
  """VLC's pretraining objective over a SingleStream model."""

  model: SingleStream
  specials: text_masking.TextSpecials
  context_length: int
  num_keep: int  # Patches entering the encoder per image (static).
  mlm_ratio: float = 0.15
  whole_word: bool = True
  norm_pix_loss: bool = True
  mlm_weight: float = 1.0
  mae_weight: float = 1.0
  itm_weight: float = 1.0
  wpa: bool = True
  wpa_weight: float = 0.1
  init_specs: tuple[pretrained.InitSpec, ...] = ()
  report_name: str = "vlp_jax-VLC"
  name = "vlc"

  @property
  def num_patches(self) -> int:
    return self.model.encoder.num_patches

  # ------------------------------------------------------------ jitted

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size = self.model.encoder.image_size
    tokens = jax.ShapeDtypeStruct((batch_size, self.context_length), jnp.int32)
    spec = {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8), "tokens": tokens}
    if self.whole_word:
      spec["tokens_word_ids"] = tokens
    return spec

  def init(self, rng: jax.Array) -> tuple[Params, Extra]:
    return self.model.init_params(rng, self.context_length), {}

  def _keep(self, rng: jax.Array, batch: int) -> jax.Array | None:
    if self.num_keep >= self.num_patches:
      return None
    return random_masking.random_keep(rng, batch, self.num_patches, self.num_keep)

  def loss(
    self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, tuple[Metrics, Extra]]:
    del step
    images, tokens = batch["image"], batch["tokens"]
    word_ids = batch["tokens_word_ids"] if self.whole_word else None
    text_rng, mask_rng, pair_rng, itm_mask_rng = jax.random.split(rng, 4)
    rows = images.shape[0]
    # Pass 1 (MLM + MAE): masked text, masked image. Pass 2 (ITM): unmasked text, half
    # the images another row's, masked afresh.
    inputs, selected = text_masking.mask_text(
      text_rng, tokens, self.specials, self.mlm_ratio, word_ids
    )
    keep = self._keep(mask_rng, rows)
    itm_images, labels = itm_pairs(pair_rng, images)
    itm_keep = self._keep(itm_mask_rng, rows)
    reconstruct = self.mae_weight > 0
    real = tokens != self.model.encoder.pad_id  # Keys of both passes: the caption's tokens.

    def forward(model: SingleStream) -> dict[str, jax.Array]:
      # Both passes in one encoder call: each row's two passes side by side, so the rows
      # stay on their devices, and one program instead of two (faster to compile).
      text, image, pooled = model.encode(
        _interleave(images, itm_images),
        _interleave(inputs, tokens),
        None if keep is None else _interleave(keep, itm_keep),
        text_mask=_interleave(real, real),
      )
      (mlm_text, itm_text), (mae_image, itm_image) = _split(text), _split(image)
      out = {"mlm_logits": model.mlm_logits(mlm_text)}
      out["itm_logits"] = model.itm_logits(_split(pooled)[1])
      out["itm_text"], out["itm_image"] = itm_text, itm_image
      if reconstruct:
        out["pixels"] = model.reconstruct(mae_image, keep)
      return out

    out = self.model.apply({"params": params}, method=forward, rngs=dropout_rngs(rng))
    mlm, mlm_metrics = losses.mlm_loss(out["mlm_logits"], tokens, selected)
    itm, itm_metrics = losses.itm_loss(out["itm_logits"], labels)
    metrics = {"mlm_loss": mlm, "itm_loss": itm, **mlm_metrics, **itm_metrics}
    total = self.mlm_weight * mlm + self.itm_weight * itm
    if reconstruct:
      encoder = self.model.encoder
      pixels = normalize_pixels(images, encoder.mean, encoder.std, jnp.float32)
      patches = patchify(pixels, encoder.size.patch_size)
      masked = (
        jnp.zeros(patches.shape[:2], bool)
        if keep is None
        else random_masking.mask_from_keep(keep, self.num_patches)
      )
      metrics["mae_loss"] = mae_loss(out["pixels"], patches, masked, self.norm_pix_loss)
      total = total + self.mae_weight * metrics["mae_loss"]
    if self.wpa:
      # Words: no [CLS] / [SEP] / padding; patches: no class token (as ViLT).
      text_valid = text_masking.maskable(tokens, self.specials.never_mask)
      image = out["itm_image"][:, 1:]
      distance = optimal_transport_distance(
        out["itm_text"], image, text_valid, jnp.ones(image.shape[:2], bool)
      )
      # Pull matched pairs together, push mismatched ones apart.
      metrics["wpa_loss"] = jnp.sum(jnp.where(labels == 1, distance, -distance)) / rows
      total = total + self.wpa_weight * metrics["wpa_loss"]
    metrics["loss"] = total
    return total, (metrics, extra)

  def predict_fns(self) -> dict[str, PredictFn]:
    model = self.model

    def match_image(params: Params, images: jax.Array) -> jax.Array:
      # The per-image state ITM re-ranking keeps: the uint8 pixels themselves (a
      # single-stream model sees image and text together; patch embedding is cheap).
      del params
      return images

    def match_score(params: Params, images: jax.Array, tokens: jax.Array) -> jax.Array:
      def score(module: SingleStream) -> jax.Array:
        return module.itm_logits(module.encode(images, tokens)[2])

      # The "matched" logit, as ALBEF's and VLC's retrieval rank by.
      return model.apply({"params": params}, method=score)[:, 1].astype(jnp.float32)

    return {"match_image": match_image, "match_score": match_score}

  # ------------------------------------------------------------ host

  def pipeline_extension(self, ctx: DataContext) -> RowExtension | None:
    del ctx
    return WithWordIds() if self.whole_word else None

  def pretrained_params(self, gather: Callable[[], Params]) -> Params | None:
    if not self.init_specs:
      return None
    from vlp_jax.weights import timm_vit

    params = gather()
    for spec in self.init_specs:
      try:
        params = timm_vit.import_mae_into_vlc(spec.path, params)
      except (ValueError, OSError) as e:
        raise ConfigError(f"{spec.key}: {e}") from e
    return params

  def summary(self, params: Params) -> str:
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    return (
      f"{count(params) / 1e6:.2f}M parameters (encoder {count(params['encoder']) / 1e6:.2f}M, "
      f"MAE decoder {count(params['decoder']) / 1e6:.2f}M); {self.num_keep} of "
      f"{self.num_patches} patches enter the encoder"
    )

  @property
  def model_name(self) -> str:
    return self.report_name


def create_model(
  config: ml_collections.ConfigDict,
  vocab_size: int,
  pad_id: int,
  context_length: int,
  platform: str | None = None,
) -> SingleStream:
  """The SingleStream of config.model (encoder) and config.vlc (decoder); `platform`: the
  target mesh's (clip.create_model's)."""
  image, text, vlc = config.model.image, config.model.text, config.vlc
  refuse_scan_layers(config.model.get("scan_layers", False), "VLC's single-stream encoder")
  size = vit_size(image)
  for key, width in (("model.image.width", size.width), ("vlc.decoder_width", vlc.decoder_width)):
    if width % 4:
      raise ValueError(f"config.{key}={width}: sin-cos positions need a multiple of 4")
  if text.attention_dropout:
    raise ValueError(
      f"config.model.text.attention_dropout={text.attention_dropout}: VLC's text has no "
      "attention of its own; the single stream's is config.model.image.attention_dropout"
    )
  max_positions = text_positions(text, context_length)
  to_255 = lambda v: tuple(x * 255 for x in v) if v is not None else None  # noqa: E731
  dtype = compute_dtype(config.model.dtype, platform)
  encoder = SingleStreamEncoder(
    size=size,
    image_size=image.image_size,
    vocab_size=text.vocab_size or vocab_size,
    max_text_positions=max_positions,
    pad_id=pad_id,
    mean=to_255(image.mean) or CLIP_MEAN,
    std=to_255(image.std) or CLIP_STD,
    activation=config.model.activation,
    remat=config.model.remat,
    dtype=dtype,
    layer_norm_eps=image.layer_norm_eps,
    text_layer_norm_eps=text.layer_norm_eps,
    patch_bias=image.patch_bias,
    text_dropout=text.dropout,  # VLC: drop_rate 0.1, on its BertEmbeddings only.
    dropout=image.dropout,  # VLC's blocks: none (mae_transformer.py's Block(drop=0)).
    attention_dropout=image.attention_dropout,
  )
  decoder = MaeDecoder(
    width=vlc.decoder_width,
    depth=vlc.decoder_depth,
    num_heads=vlc.decoder_num_heads,
    mlp_dim=vlc.decoder_mlp_dim,
    grid=encoder.grid,
    patch_size=size.patch_size,
    activation=config.model.activation,
    remat=config.model.remat,
    dtype=dtype,
    layer_norm_eps=image.layer_norm_eps,
  )
  return SingleStream(encoder, decoder)


def create(ctx: MethodContext) -> Vlc:
  """The method from config.model / config.vlc (ValueError naming a bad key)."""
  config, vlc = ctx.config, ctx.config.vlc
  if config.batch_size < 2:
    raise ValueError(f"config.batch_size={config.batch_size}: ITM needs two rows to swap images")
  specs = tuple(pretrained.parse_specs(config, check_paths=False))
  for spec in specs:
    if spec.kind != "image" or spec.source not in ("timm", "auto"):
      raise ValueError(
        f"{spec.key}: VLC starts from an MAE / timm ViT only, as "
        'config.model.image.init="timm:PATH" (its encoder and decoder)'
      )
  tokenizer = ctx.tokenizer
  # Every special token stays (pad, [CLS], [SEP]); with word ids they have none anyway.
  specials = text_masking.text_specials(tokenizer, ("pad_id", "cls_id", "sep_id"))
  model = create_model(
    config, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.context_length, ctx.platform
  )
  num_patches = model.encoder.num_patches
  num_keep = int(num_patches * (1 - vlc.mask_ratio))  # MAE's rounding.
  if num_keep < 1:
    raise ValueError(f"config.vlc.mask_ratio={vlc.mask_ratio} keeps no patch of {num_patches}")
  image = config.model.image
  return Vlc(
    model=model,
    specials=specials,
    context_length=tokenizer.context_length,
    num_keep=num_keep,
    mlm_ratio=vlc.mlm_ratio,
    whole_word=vlc.whole_word,
    norm_pix_loss=vlc.norm_pix_loss,
    mlm_weight=vlc.mlm_weight,
    mae_weight=vlc.mae_weight,
    itm_weight=vlc.itm_weight,
    wpa=vlc.wpa,
    wpa_weight=vlc.wpa_weight,
    init_specs=specs,
    report_name=f"vlp_jax-VLC-ViT-{image.variant}-{image.image_size}px",
  )


# ---------------------------------------------------------------- config.vlc


def _config_defaults() -> ml_collections.ConfigDict:
  """config.vlc (VLC, and its fine-tuning methods' encoder): one single-stream transformer
  over [text; image] trained with MLM + MAE + ITM. The encoder is config.model.image's ViT
  in MAE's layout (layer_norm_eps, patch_bias, mean / std apply; pre_norm and pool do not:
  no ln_pre, every token through the final norm, the text's [CLS] pooled); its text side
  reads config.model.text's context_length, max_positions, vocab_size and layer_norm_eps.
  An MAE checkpoint (encoder and decoder): config.model.image.init."""
  block = ml_collections.ConfigDict()
  block.mlm_ratio = 0.15  # Share of words (whole_word) or tokens predicted by MLM.
  block.whole_word = True  # Mask every piece of a selected word (tokens_word_ids).
  block.mask_ratio = 0.6  # Share of patches dropped from the encoder, in both passes.
  block.norm_pix_loss = True  # MAE's target: pixels normalised per patch.
  block.mlm_weight = 1.0  # Loss weights (VLC: all 1).
  block.mae_weight = 1.0  # 0 also skips the decoder.
  block.itm_weight = 1.0
  # Word-patch alignment (ViLT's optimal transport) on the ITM pass, and its weight: on
  # at 0.1, as VLC's pretraining (compute_itm_wpa adds 0.1 x the OT loss to every step).
  block.wpa = True
  block.wpa_weight = 0.1
  # MAE decoder on the fused image tokens (MAE's ViT-B: 512 wide, 8 blocks, 16 heads).
  block.decoder_width = 512
  block.decoder_depth = 8
  block.decoder_num_heads = 16
  block.decoder_mlp_dim = 2048
  return block


# The block a run of this method carries (vlp_jax.configs.common.base_config(method)) and
# the valid range of its numeric fields, checked before any compute.
CONFIG_BLOCK = ConfigBlock(
  "vlc",
  _config_defaults,
  {
    "mlm_ratio": in_range(0, 1),
    "mask_ratio": in_range(0, 1, include_high=False),  # Keeps >= 1 patch: methods/vlc.py.
    "mlm_weight": at_least(0),
    "mae_weight": at_least(0),
    "itm_weight": at_least(0),
    "wpa_weight": at_least(0),
    "decoder_width": at_least(4),  # A multiple of 4 (sin-cos positions): methods/vlc.py.
    "decoder_depth": at_least(1),
    "decoder_num_heads": at_least(1),
    "decoder_mlp_dim": at_least(1),
  },
)
