import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.models import CLIP, TextTransformer, VisionTransformer, decode_variant
from vlp_jax.models.text import last_token_index
from vlp_jax.models.vit import VitSize, patchify


def _block_params(width: int, mlp: int) -> int:
  # 2 LayerNorms + fused qkv + out proj + 2-layer MLP, all with biases.
  return (
    2 * 2 * width
    + (3 * width * width + 3 * width)
    + (width * width + width)
    + (width * mlp + mlp + mlp * width + width)
  )


def test_variant_table_and_overrides():
  assert decode_variant("B/16") == VitSize(768, 12, 3072, 12, 16)
  assert decode_variant("L/14").width == 1024
  assert decode_variant("S/16", depth=2, width=None).depth == 2
  with pytest.raises(ValueError, match="unknown ViT variant"):
    decode_variant("B16")


def test_vit_parameter_count_follows_the_formula():
  size = VitSize(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
  model = VisionTransformer(size=size, image_size=32, embed_dim=16)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  count = sum(x.size for x in jax.tree.leaves(params))
  patches = (32 // 8) ** 2
  expected = (
    8 * 8 * 3 * 32  # conv1, no bias (as open_clip)
    + 32  # class embedding
    + (patches + 1) * 32  # positional embedding
    + 2 * 2 * 32  # ln_pre, ln_post
    + 2 * _block_params(32, 64)
    + 32 * 16  # proj, no bias
  )
  assert count == expected
  # open_clip's names, so checkpoints map one to one.
  assert set(params) == {
    "conv1",
    "class_embedding",
    "positional_embedding",
    "ln_pre",
    "transformer",
    "ln_post",
    "proj",
  }
  assert set(params["transformer"]["resblocks_0"]) == {"ln_1", "attn", "ln_2", "mlp"}
  assert set(params["transformer"]["resblocks_0"]["attn"]) == {"in_proj", "out_proj"}


def test_keep_indices_select_patch_tokens():
  size = VitSize(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4)
  model = VisionTransformer(size=size, image_size=16, embed_dim=8)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3)) * 255
  params = model.init(jax.random.PRNGKey(0), images)
  everything = jnp.tile(jnp.arange(16), (2, 1))
  full, _ = model.apply(params, images)
  same, _ = model.apply(params, images, keep_indices=everything)
  np.testing.assert_allclose(full, same, rtol=1e-5, atol=1e-6)
  masked, _ = model.apply(params, images, keep_indices=everything[:, :6])
  assert masked.shape == (2, 8) and not np.allclose(masked, full)


def test_text_pools_the_last_real_token_and_ignores_padding():
  tokens = jnp.array([[2, 7, 9, 3, 0, 0], [2, 3, 0, 0, 0, 0]])
  assert last_token_index(tokens).tolist() == [3, 1]
  model = TextTransformer(
    vocab_size=12, context_length=6, width=16, depth=1, num_heads=2, mlp_dim=32, embed_dim=8
  )
  params = model.init(jax.random.PRNGKey(0), tokens)
  padded, _ = model.apply(params, tokens[:1])
  unpadded, _ = model.apply(params, tokens[:1, :4])
  # Causal attention and end-token pooling: padding after the end changes nothing.
  np.testing.assert_allclose(padded, unpadded, rtol=1e-5, atol=1e-6)


def test_clip_outputs_unit_embeddings_and_clamped_scale():
  visual = VisionTransformer(size=VitSize(16, 1, 32, 2, 8), image_size=16, embed_dim=8)
  text = TextTransformer(
    vocab_size=10, context_length=5, width=16, depth=1, num_heads=2, mlp_dim=32, embed_dim=8
  )
  model = CLIP(visual=visual, text=text)
  images = jnp.zeros((3, 16, 16, 3), jnp.uint8)
  tokens = jnp.array([[2, 4, 3, 0, 0]] * 3)
  variables = model.init(jax.random.PRNGKey(0), images, tokens)
  out = model.apply(variables, images, tokens)
  np.testing.assert_allclose(jnp.linalg.norm(out["image"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(out["text"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
  variables["params"]["logit_scale"] = jnp.float32(10.0)
  assert float(model.apply(variables, images, tokens)["logit_scale"]) == pytest.approx(100.0)


def test_patchify_orders_patches_row_major():
  images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  patches = patchify(images, 2)
  assert patches.shape == (2, 4, 4)
  np.testing.assert_array_equal(patches[0, 1], [2, 3, 6, 7])
