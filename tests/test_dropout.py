"""Dropout (issue 32): the recipes' rates against the reference code bases, dropout only
in training steps (evaluation deterministic and undropped), a different draw for each
training rng, rate 0 exactly the undropped model (no random draw in its program),
remat redrawing the same masks, dropped attention against the explicit math, and the
refusals of keys a model cannot honour."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_albef, test_vlc
from vlp_jax import config_lib
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import (
  albef_vitb16,
  clip_vitb16,
  cmask_vitb16,
  common,
  vlc_nlvr2,
  vlc_retrieval,
  vlc_vitb16,
  vlc_vqa,
)
from vlp_jax.methods import albef
from vlp_jax.models import attention, clip, layers, stacking
from vlp_jax.models.bert import BertLayer

# ---------------------------------------------------------------- recipe defaults


def _rates(config) -> dict[str, float]:
  image, text = config.model.image, config.model.text
  return {
    "image": image.dropout,
    "image_attention": image.attention_dropout,
    "text": text.dropout,
    "text_attention": text.attention_dropout,
  }


NONE = {"image": 0.0, "image_attention": 0.0, "text": 0.0, "text_attention": 0.0}


def test_recipe_rates_are_the_references():
  # salesforce/ALBEF configs/config_bert.json: hidden_dropout_prob 0.1,
  # attention_probs_dropout_prob 0.1; models/vit.py: drop_rate = attn_drop_rate = 0 (and
  # models/model_pretrain.py passes neither).
  albef_rates = {**NONE, "text": 0.1, "text_attention": 0.1}
  assert _rates(albef_vitb16.get_config()) == albef_rates
  assert _rates(cmask_vitb16.get_config()) == albef_rates  # CMask runs ALBEF's BERT.
  # guilk/VLC vlc/config.py: drop_rate = 0.1, which vlc/modules/vlc_module.py gives its
  # BertEmbeddings only; vlc/modules/mae_transformer.py builds every Block without drop.
  vlc_rates = {**NONE, "text": 0.1}
  for recipe in (vlc_vitb16, vlc_vqa, vlc_nlvr2, vlc_retrieval):
    assert _rates(recipe.get_config()) == vlc_rates, recipe.__name__
  # open_clip: no dropout in its towers by default.
  assert _rates(clip_vitb16.get_config()) == NONE
  assert _rates(common.base_config()) == NONE


@pytest.mark.parametrize("key", ["image.dropout", "text.attention_dropout"])
def test_a_rate_of_one_fails_naming_the_key(key):
  config = common.base_config()
  tower, name = key.split(".")
  config.model[tower][name] = 1.0
  with pytest.raises(ConfigError, match=rf"model\.{key}"):
    config_lib.check_rules(config, common.RULES)


def test_clip_refuses_dropout_it_would_not_apply():
  config = common.base_config()
  config.model.text.dropout = 0.1
  with pytest.raises(ValueError, match=r"config.model.text.dropout=0.1: CLIP's towers"):
    clip.create_model(config.model, vocab_size=100)


def test_vlc_refuses_text_attention_dropout():
  config = test_vlc.tiny_config()
  config.model.text.attention_dropout = 0.1
  with pytest.raises(ValueError, match=r"config.model.text.attention_dropout=0.1: VLC"):
    test_vlc.create(config)


# ---------------------------------------------------------------- the layers


def test_rate_zero_draws_nothing_and_equals_the_undropped_block():
  block = layers.ResidualBlock(num_heads=2, mlp_dim=16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  params = block.init(jax.random.PRNGKey(0), x)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  apply = jax.jit(block.apply)
  np.testing.assert_array_equal(apply(params, x, rngs=rngs), apply(params, x))

  # Forward and backward at rate 0 hold no random draw (the CPU attention keeps only its
  # weights for the backward pass); at rate > 0 they do.
  def jaxpr(module):
    grad = jax.grad(lambda p: jnp.sum(module.apply(p, x, rngs=rngs)))
    return str(jax.make_jaxpr(grad)(params))

  assert "random_bits" not in jaxpr(block)
  assert "random_bits" in jaxpr(layers.ResidualBlock(2, 16, dropout=0.1, attention_dropout=0.1))


def test_dropout_draws_per_rng_and_only_in_training():
  layer = BertLayer(num_heads=2, mlp_dim=16, dropout=0.5, attention_dropout=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.ones((2, 5), bool)
  params = layer.init(jax.random.PRNGKey(0), x, mask)
  evaluated = layer.apply(params, x, mask)
  np.testing.assert_array_equal(evaluated, layer.apply(params, x, mask))  # No rng: identity.
  rngs = {"dropout": jax.random.PRNGKey(1)}
  plain = BertLayer(num_heads=2, mlp_dim=16).apply(params, x, mask, rngs=rngs)
  np.testing.assert_array_equal(evaluated, plain)  # Evaluation = the rate-0 layer.
  a, b = (layer.apply(params, x, mask, rngs={"dropout": jax.random.PRNGKey(s)}) for s in (1, 2))
  assert not np.allclose(a, evaluated) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, layer.apply(params, x, mask, rngs=rngs))  # Same rng, same draw.


def test_rematerialised_layers_draw_the_same_masks_again():
  # The recomputation in the backward pass must drop what the forward pass dropped.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.ones((2, 5), bool)
  kwargs = dict(num_heads=2, mlp_dim=16, dropout=0.3, attention_dropout=0.3)
  params = BertLayer(**kwargs).init(jax.random.PRNGKey(0), x, mask)
  rngs = {"dropout": jax.random.PRNGKey(1)}

  def grads(cls):
    loss = lambda p: jnp.sum(jnp.sin(cls(**kwargs).apply(p, x, mask, rngs=rngs)))  # noqa: E731
    return jax.jit(jax.grad(loss))(params)

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    grads(BertLayer),
    grads(stacking.with_remat(BertLayer, "full")),
  )


def test_inverted_dropout_zeroes_its_share_and_keeps_the_mean():
  class Dropped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.apply_dropout(self, x, 0.3)

  x = jnp.ones((200, 100))
  out = Dropped().apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)})
  assert abs(float(jnp.mean(out == 0)) - 0.3) < 0.01
  assert abs(float(jnp.mean(out)) - 1.0) < 0.02


def test_dropped_attention_equals_the_explicit_math_forward_and_backward():
  rng = np.random.default_rng(0)
  q, k, v, cotangent = (jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(4))
  padding = jnp.asarray(rng.random((2, 5)) < 0.7).at[:, 0].set(True)
  key, rate = jax.random.PRNGKey(3), 0.3

  def ours(q, k, v):
    return attention.dot_product_attention(
      q, k, v, "xla", padding_mask=padding, dropout_rate=rate, dropout_rng=key
    )

  def explicit(q, k, v):
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    logits = q @ jnp.swapaxes(k, -1, -2) * q.shape[-1] ** -0.5
    weights = jax.nn.softmax(jnp.where(padding[:, None, None], logits, -1e30), axis=-1)
    kept = jax.random.bernoulli(key, 1 - rate, weights.shape)
    return jnp.swapaxes(jnp.where(kept, weights / (1 - rate), 0.0) @ v, 1, 2)

  np.testing.assert_allclose(ours(q, k, v), explicit(q, k, v), rtol=1e-5, atol=1e-6)
  grads = [
    jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    for f in (ours, explicit)
  ]
  for got, want in zip(*grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- ALBEF / CMask


def _albef(rate: float, **fields) -> albef.Albef:
  config = test_albef.tiny_albef_config()
  config.model.text.dropout = config.model.text.attention_dropout = rate
  return test_albef.build_method(config, **fields)


@pytest.fixture(scope="module")
def albef_state():
  method = _albef(0.0)
  return jax.tree.map(np.asarray, jax.jit(method.init)(jax.random.PRNGKey(0)))


def test_albef_evaluation_is_deterministic_and_undropped(albef_state):
  params = {"model": albef_state[0]["model"]}
  batch = test_albef.random_batch()
  score = {rate: jax.jit(_albef(rate).predict_fns()["match_score"]) for rate in (0.0, 0.1)}
  image_tokens = jax.jit(_albef(0.0).predict_fns()["match_image"])(params, batch["image"])
  first = score[0.1](params, image_tokens, batch["tokens"])  # Text, fusion and ITM head.
  np.testing.assert_array_equal(first, score[0.1](params, image_tokens, batch["tokens"]))
  np.testing.assert_array_equal(first, score[0.0](params, image_tokens, batch["tokens"]))


def test_albef_training_step_drops_per_rng_and_rate_zero_is_unchanged(albef_state):
  batch = test_albef.random_batch()
  # Negatives and MLM tokens fixed: the rng reaches the losses through dropout alone.
  fixed = dict(cls=test_albef.FixedChoices, fixed=test_albef._fixed_choices(batch))
  params, extra = albef_state
  losses = {}
  for rate in (0.0, 0.1):
    step = jax.jit(_albef(rate, **fixed).loss)
    for seed in (1, 2):
      losses[rate, seed] = float(step(params, extra, batch, jax.random.PRNGKey(seed), 3)[0])
  assert losses[0.0, 1] == losses[0.0, 2]
  assert losses[0.1, 1] != losses[0.1, 2]
  assert losses[0.1, 1] != losses[0.0, 1]


# ---------------------------------------------------------------- VLC


def test_vlc_drops_the_text_embeddings_in_training_only():
  methods = {}
  for rate in (0.0, 0.1):
    config = test_vlc.tiny_config()
    config.model.text.dropout = rate
    methods[rate] = test_vlc.create(config)
  params, extra = jax.jit(methods[0.0].init)(jax.random.PRNGKey(0))
  batch = test_vlc.random_batch()

  score = {rate: jax.jit(m.predict_fns()["match_score"]) for rate, m in methods.items()}
  first = score[0.1](params, batch["image"], batch["tokens"])
  np.testing.assert_array_equal(first, score[0.1](params, batch["image"], batch["tokens"]))
  np.testing.assert_array_equal(first, score[0.0](params, batch["image"], batch["tokens"]))

  losses = {}
  for rate, method in methods.items():
    step = jax.jit(method.loss)
    for seed in (1, 2):
      losses[rate, seed] = float(step(params, extra, batch, jax.random.PRNGKey(seed), 0)[0])
  # The same rng draws the same text masks, patch masks and pairs: only dropout differs.
  assert losses[0.1, 1] != losses[0.0, 1]
  assert losses[0.1, 2] != losses[0.0, 2]
