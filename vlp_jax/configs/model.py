"""config.model's defaults and rules: the image and text towers every method builds from
(vlp_jax/models), merged into the base config by vlp_jax.configs.common."""

from __future__ import annotations

import ml_collections

from vlp_jax.config_lib import Rule, at_least, each, in_range, positive


def add_model(config: ml_collections.ConfigDict) -> None:
  """config.model: the towers' shared fields and the image tower, then the text tower."""
  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 512  # Joint embedding width.
  config.model.activation = "gelu"  # "gelu" (exact) or "quick_gelu" (OpenAI CLIP).
  # Compute dtype; params stay float32 (master weights), logits, softmax, layer-norm
  # statistics and losses are float32. "auto": bfloat16 on GPU/TPU, float32 on CPU.
  config.model.dtype = "auto"
  # Attention kernel: "auto" (cuDNN flash attention on NVIDIA GPUs where dtype and head
  # size allow, XLA elsewhere), "xla", or "cudnn" (fails before compute where it cannot run).
  config.model.attention = "auto"
  # Activation rematerialisation: "none", "full" (recompute blocks: least memory) or
  # "dots" (keep matmul outputs, recompute elementwise ops).
  config.model.remat = "none"
  # One nn.scan over each CLIP tower's blocks (the ViT and the causal text tower; parameters
  # stacked under "resblocks", leading axis = depth): compile time no longer grows with
  # depth; remat still applies per block. Checkpoints, init_from and weight import/export
  # convert between layouts. A BERT text tower, ALBEF / CMask and VLC stay unrolled
  # (not applied); peft modes that treat blocks differently (unlock_last) are refused.
  config.model.scan_layers = False
  # A whole pretrained CLIP ("open_clip:PATH", "hf_clip:PATH" or a converted directory),
  # loaded when the workdir has no checkpoint yet; the tower inits below override its parts.
  config.model.init = ""
  config.model.image = ml_collections.ConfigDict()
  config.model.image.variant = "B/16"  # ViT size/patch, e.g. "Ti/16", "S/16", "B/16", "L/14".
  config.model.image.image_size = 224  # Input resolution in pixels.
  # Per-field overrides of the variant table (None: take the variant's value).
  config.model.image.width = ml_collections.FieldReference(None, field_type=int)
  config.model.image.depth = ml_collections.FieldReference(None, field_type=int)
  config.model.image.mlp_dim = ml_collections.FieldReference(None, field_type=int)
  config.model.image.num_heads = ml_collections.FieldReference(None, field_type=int)
  # Architecture options for towers converted from timm / MAE (vlp_jax.weights; the
  # converter prints the values a checkpoint needs). Defaults: open_clip's ViT.
  config.model.image.layer_norm_eps = 1e-5  # timm / MAE: 1e-6.
  config.model.image.patch_bias = False  # A bias on the patch embedding (timm / MAE: True).
  config.model.image.pre_norm = True  # ln_pre before the blocks (timm / MAE: False).
  config.model.image.pool = "cls"  # "cls" token or "mean" of patch tokens (timm "avg").
  # Pixel statistics in [0, 1] units, RGB; None: OpenAI CLIP's. timm / MAE ViTs mostly
  # use ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
  config.model.image.mean = ml_collections.FieldReference(None, field_type=tuple)
  config.model.image.std = ml_collections.FieldReference(None, field_type=tuple)
  # Dropout in the image tower's blocks during training steps (evaluation never drops):
  # timm's drop_rate (attention output, MLP) and attn_drop_rate (attention probabilities).
  # 0 in every reference: open_clip, ALBEF's ViT (models/vit.py), VLC's single-stream
  # blocks (vlc/modules/mae_transformer.py). ALBEF / CMask / VLC only: CLIP refuses > 0.
  config.model.image.dropout = 0.0
  config.model.image.attention_dropout = 0.0
  # Pretrained image tower: "FORMAT:PATH" with FORMAT open_clip (a CLIP's visual part),
  # hf_clip or timm (also MAE), or a directory written by `python -m vlp_jax.weights.convert`.
  # Loaded when the workdir has no checkpoint yet; "": random initialisation.
  config.model.image.init = ""
  _add_text_tower(config)


def _add_text_tower(config: ml_collections.ConfigDict) -> None:
  """config.model.text."""
  config.model.text = ml_collections.ConfigDict()
  # "clip": causal transformer pooling the end token (open_clip's); "bert": bidirectional
  # BERT-family encoder (BERT, MiniLM, SimCSE) with config.model.text.pooling.
  config.model.text.kind = "clip"
  config.model.text.pooling = "cls"  # bert: "cls" token or "mean" over non-pad tokens.
  # bert: position-embedding rows (the checkpoint's max_position_embeddings); None:
  # context_length. Captions are still cut to context_length tokens.
  config.model.text.max_positions = ml_collections.FieldReference(None, field_type=int)
  config.model.text.layer_norm_eps = 1e-12  # bert only (CLIP's text tower uses 1e-5).
  # Pretrained text tower: "FORMAT:PATH", FORMAT hf_bert (a Hugging Face model directory),
  # open_clip or hf_clip (the text part), or a converted directory; "": random init.
  config.model.text.init = ""
  # Token embedding rows; None: the tokenizer's vocabulary size.
  config.model.text.vocab_size = ml_collections.FieldReference(None, field_type=int)
  config.model.text.context_length = 77  # Tokens per caption, including [CLS]/[SEP].
  config.model.text.width = 512
  config.model.text.depth = 12
  config.model.text.num_heads = 8
  config.model.text.mlp_dim = 2048
  # Dropout in the text tower during training steps (evaluation never drops). ALBEF /
  # CMask's BERT: hidden_dropout_prob (embeddings, attention and FFN outputs) and
  # attention_probs_dropout_prob (self- and cross-attention), 0.1 each in ALBEF's
  # configs/config_bert.json (configs/albef_vitb16.py sets them). VLC: dropout on the text
  # embeddings only, 0.1 (vlc/config.py drop_rate; configs/vlc_vitb16.py), and no
  # attention_dropout. CLIP's towers (open_clip): none, and > 0 is refused.
  config.model.text.dropout = 0.0
  config.model.text.attention_dropout = 0.0


# The valid range of config.model's numeric fields (vlp_jax.configs.common.RULES).
RULES: dict[str, Rule] = {
  "model.embed_dim": at_least(1),
  "model.image.image_size": at_least(1),
  "model.image.width": at_least(1),
  "model.image.depth": at_least(1),
  "model.image.mlp_dim": at_least(1),
  "model.image.num_heads": at_least(1),
  "model.image.layer_norm_eps": positive(),
  "model.image.mean": each(in_range(0, 1), length=3),
  "model.image.std": each(positive(), length=3),
  "model.image.dropout": in_range(0, 1, include_high=False),
  "model.image.attention_dropout": in_range(0, 1, include_high=False),
  "model.text.max_positions": at_least(1),
  "model.text.layer_norm_eps": positive(),
  "model.text.vocab_size": at_least(1),
  "model.text.context_length": at_least(2),  # Room for the start and end tokens.
  "model.text.width": at_least(1),
  "model.text.depth": at_least(1),
  "model.text.num_heads": at_least(1),
  "model.text.mlp_dim": at_least(1),
  "model.text.dropout": in_range(0, 1, include_high=False),
  "model.text.attention_dropout": in_range(0, 1, include_high=False),
}
