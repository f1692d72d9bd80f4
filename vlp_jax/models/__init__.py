"""Flax models: ViT image tower, CLIP text tower, two-tower CLIP."""

from vlp_jax.models.clip import CLIP, create_model, embedding_fns
from vlp_jax.models.text import TextTransformer
from vlp_jax.models.vit import VisionTransformer, decode_variant

__all__ = [
  "CLIP",
  "TextTransformer",
  "VisionTransformer",
  "create_model",
  "decode_variant",
  "embedding_fns",
]
