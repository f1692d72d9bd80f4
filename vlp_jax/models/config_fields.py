"""Reading config.model the way every model builder does (clip.create_model, albef's
create_albef_model, VLC's create_model): each reader fails before compute, naming the key."""

from __future__ import annotations

import ml_collections

from vlp_jax.models.vit import VitSize, decode_variant


def vit_size(image_cfg: ml_collections.ConfigDict) -> VitSize:
  """config.model.image's variant with its overrides (width, depth, mlp_dim, num_heads),
  refused when its image_size is not a whole number of patches."""
  size = decode_variant(
    image_cfg.variant,
    width=image_cfg.width,
    depth=image_cfg.depth,
    mlp_dim=image_cfg.mlp_dim,
    num_heads=image_cfg.num_heads,
  )
  if image_cfg.image_size % size.patch_size:
    raise ValueError(
      f"config.model.image.image_size={image_cfg.image_size} is not a multiple of the "
      f"patch size {size.patch_size}"
    )
  return size


def text_vocab_size(text_cfg: ml_collections.ConfigDict, vocab_size: int) -> int:
  """config.model.text.vocab_size, else the tokenizer's `vocab_size`; never fewer."""
  if text_cfg.vocab_size is not None and text_cfg.vocab_size < vocab_size:
    raise ValueError(
      f"config.model.text.vocab_size={text_cfg.vocab_size} is smaller than the "
      f"tokenizer's vocabulary ({vocab_size})"
    )
  return text_cfg.vocab_size or vocab_size


def text_positions(text_cfg: ml_collections.ConfigDict, context_length: int) -> int:
  """The text position table's length: config.model.text.max_positions (a pretrained
  BERT's 512), else `context_length`; never fewer than the tokens it embeds."""
  positions = text_cfg.max_positions or context_length
  if positions < context_length:
    raise ValueError(
      f"config.model.text.max_positions={positions} is smaller than context_length {context_length}"
    )
  return positions
