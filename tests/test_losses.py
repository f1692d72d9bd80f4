import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax import losses, sharding
from vlp_jax.losses import clip_loss


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def numpy_clip_loss(image: np.ndarray, text: np.ndarray, scale: float) -> float:
  logits = scale * image @ text.T
  n = len(logits)
  i2t = -_log_softmax(logits)[np.arange(n), np.arange(n)].mean()
  t2i = -_log_softmax(logits.T)[np.arange(n), np.arange(n)].mean()
  return float((i2t + t2i) / 2)


def test_clip_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  for batch, dim, scale in [(1, 4, 1.0), (7, 16, 14.3), (32, 8, 100.0)]:
    image = rng.normal(size=(batch, dim)).astype(np.float32)
    text = rng.normal(size=(batch, dim)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    loss, metrics = clip_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(scale))
    np.testing.assert_allclose(float(loss), numpy_clip_loss(image, text, scale), rtol=1e-5)
    expected_accuracy = np.mean(np.argmax(image @ text.T, axis=1) == np.arange(batch))
    assert float(metrics["train_i2t_accuracy"]) == expected_accuracy


def test_clip_loss_is_low_for_aligned_and_high_for_shuffled_pairs():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 32)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  aligned, _ = clip_loss(jnp.asarray(x), jnp.asarray(x), jnp.float32(50.0))
  shuffled, _ = clip_loss(jnp.asarray(x), jnp.asarray(x[::-1]), jnp.float32(50.0))
  assert float(aligned) < 0.1 < np.log(16) < float(shuffled)


def numpy_siglip_loss(image: np.ndarray, text: np.ndarray, scale: float, bias: float) -> float:
  logits = scale * image @ text.T + bias
  signs = 2 * np.eye(len(logits)) - 1
  return float(np.logaddexp(0, -signs * logits).sum() / len(logits))


def _embeddings(batch: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  image, text = rng.normal(size=(2, batch, dim)).astype(np.float32)
  # Correlated pairs, so the positives score higher than most negatives.
  text = text + 2 * image
  image /= np.linalg.norm(image, axis=1, keepdims=True)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  return image, text


def test_siglip_loss_matches_numpy_reference():
  image, text = _embeddings(12, 8, 2)
  loss, _ = losses.siglip_loss(jnp.asarray(image), jnp.asarray(text), 10.0, -10.0)
  np.testing.assert_allclose(float(loss), numpy_siglip_loss(image, text, 10.0, -10.0), rtol=1e-5)


MESHES = [{"data": 8}, {"data": 4, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 2}]


@pytest.mark.parametrize("axes", MESHES, ids=str)
@pytest.mark.parametrize(
  ("kind", "form", "reference"),
  [
    ("clip", "gathered", losses.clip_loss),
    ("clip", "local", losses.clip_loss),
    ("siglip", "ring", losses.siglip_loss),
  ],
)
def test_sharded_losses_equal_the_single_device_loss_and_gradients(axes, kind, form, reference):
  mesh = sharding.create_mesh(axes)
  config = ml_collections.ConfigDict({"kind": kind, "form": form})
  sharded = losses.create_loss(config, mesh)
  image, text = _embeddings(32, 16, 3)
  scale, bias = jnp.float32(7.0), jnp.float32(-3.0)

  def grads(loss_fn, image, text):
    value_and_grad = jax.value_and_grad(lambda *a: loss_fn(*a)[0], argnums=(0, 1, 2, 3))
    return value_and_grad(image, text, scale, bias)

  expected_loss, expected_grads = grads(reference, jnp.asarray(image), jnp.asarray(text))
  rows = sharding.batch_sharding(mesh)
  placed = [jax.device_put(x, rows) for x in (image, text)]
  loss, got_grads = jax.jit(functools.partial(grads, sharded))(*placed)
  np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
  for got, want in zip(got_grads, expected_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
  if kind == "clip":
    _, metrics = jax.jit(sharded)(*placed, scale, bias)
    _, expected = reference(jnp.asarray(image), jnp.asarray(text), scale)
    assert float(metrics["train_i2t_accuracy"]) == float(expected["train_i2t_accuracy"])


def test_ring_siglip_accuracy_matches_the_full_form():
  mesh = sharding.create_mesh({"data": 8})
  image, text = _embeddings(32, 16, 4)
  ring = losses.ring_siglip_loss(mesh)
  rows = sharding.batch_sharding(mesh)
  _, metrics = jax.jit(ring)(jax.device_put(image, rows), jax.device_put(text, rows), 5.0, 0.0)
  _, expected = losses.siglip_loss(jnp.asarray(image), jnp.asarray(text), 5.0, 0.0)
  assert float(metrics["train_i2t_accuracy"]) == float(expected["train_i2t_accuracy"])


@pytest.mark.parametrize(
  ("kind", "form", "message"),
  [("infonce", "auto", "config.loss.kind='infonce'"), ("clip", "ring", "config.loss.form='ring'")],
)
def test_bad_loss_configs_name_the_key(kind, form, message):
  config = ml_collections.ConfigDict({"kind": kind, "form": form})
  with pytest.raises(ValueError, match=message):
    losses.create_loss(config, sharding.create_mesh({"data": -1}))


def test_hard_negatives_come_from_the_softmax_without_the_positive_or_excluded():
  similarity = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)) * 3, jnp.float32)
  exclude = jnp.zeros((4, 4), bool).at[0, 1].set(True)
  draws = jax.vmap(lambda k: losses.sample_negatives(k, similarity, exclude))(
    jax.random.split(jax.random.PRNGKey(0), 4000)
  )
  draws = np.asarray(draws)
  assert (draws != np.arange(4)).all() and (draws[:, 0] != 1).all()
  # Row 2's frequencies follow softmax over its three other columns.
  logits = np.asarray(similarity[2]).copy()
  logits[2] = -np.inf
  expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  counts = np.bincount(draws[:, 2], minlength=4) / len(draws)
  np.testing.assert_allclose(counts, expected, atol=0.03)
  # Nothing left to draw: the row's own index.
  assert int(losses.sample_negatives(jax.random.PRNGKey(0), jnp.zeros((1, 1)))[0]) == 0


def test_mlm_loss_averages_selected_tokens_and_mixes_soft_targets():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, size=(2, 3))
  selected = np.array([[True, False, True], [False, False, True]])
  soft = rng.dirichlet(np.ones(5), size=(2, 3)).astype(np.float32)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  hard = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  distilled = -(soft * log_probs).sum(-1)
  expected = 0.6 * hard[selected].mean() + 0.4 * distilled[selected].mean()
  loss, metrics = losses.mlm_loss(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(selected), jnp.asarray(soft), 0.4
  )
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  accuracy = (logits.argmax(-1) == targets)[selected].mean()
  np.testing.assert_allclose(float(metrics["mlm_accuracy"]), accuracy)
  nothing, _ = losses.mlm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 3), bool))
  assert float(nothing) == 0.0
