"""CMask's masking agent: one logit per text token, saying which words need the image.

The policy reads what the main model already computed, its lower (text-only) layer
states and the image tokens, and adds a few layers of its own with cross-attention to
the image, so it can tell a word the image grounds ("red", "left of") from one the text
alone predicts ("a", "the"). `masking.curriculum` turns the logits into masks and a
REINFORCE loss. The caller keeps the parameters apart (params["agent"]) for their own
optimizer group.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.fusion import FusionLayer

# Logit of tokens that are never masked: far below any real logit, yet finite so that
# logits - logsumexp and its gradient stay finite.
INVALID_LOGIT = -1e9


class MaskingAgent(nn.Module):
  """(text (B, T, W), image (B, N, Wi), mask (B, T), valid (B, T)) -> logits (B, T).

  `mask` is true at the text tokens attention may look at (not padding), `valid` at the
  tokens that may be masked (not pad, CLS or SEP); invalid tokens get INVALID_LOGIT.
  width: the agent's own width (a Dense from W first), None for W: a narrower agent
  keeps its cost a small part of the step's.
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  width: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, text: jax.Array, image: jax.Array, mask: jax.Array, valid: jax.Array
  ) -> jax.Array:
    # The caller stops these too; here it is a guarantee that the agent's loss never
    # trains the main model.
    x = jax.lax.stop_gradient(text)
    image = jax.lax.stop_gradient(image)
    if self.width is not None and self.width != x.shape[-1]:
      x = nn.Dense(self.width, dtype=self.dtype, name="input_projection")(x)
    for i in range(self.num_layers):
      x, _ = FusionLayer(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype, name=f"layer_{i}"
      )(x, mask, image)
    # Zero kernel: the untrained agent is uniform random masking, where the curriculum
    # starts. No bias: a shift common to all tokens does not change the policy.
    logits = nn.Dense(
      1, use_bias=False, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="logit"
    )(x)[..., 0]
    return jnp.where(valid, logits.astype(jnp.float32), INVALID_LOGIT)
