import jax.numpy as jnp
import numpy as np

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
