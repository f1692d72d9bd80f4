import numpy as np
import pytest

from vlp_jax.evaluation.retrieval import format_table, retrieval_metrics


def brute_force_recalls(image, text, text_to_image, k):
  """Definitions written the slow way: full stable sorts of every score row."""
  scores = text @ image.T
  t2i_hits = [
    text_to_image[t] in np.argsort(-scores[t], kind="stable")[:k] for t in range(len(text))
  ]
  i2t_hits = []
  for i in range(len(image)):
    top = np.argsort(-scores[:, i], kind="stable")[:k]
    i2t_hits.append(any(text_to_image[t] == i for t in top))
  return np.mean(t2i_hits), np.mean(i2t_hits)


@pytest.mark.parametrize("block", [3, 4096])
def test_metrics_match_brute_force_with_several_captions_per_image(block):
  rng = np.random.default_rng(0)
  num_images, num_texts = 40, 130
  image = rng.normal(size=(num_images, 8)).astype(np.float32)
  text = rng.normal(size=(num_texts, 8)).astype(np.float32)
  text_to_image = np.concatenate([np.arange(num_images), rng.integers(0, num_images, 90)])
  rng.shuffle(text_to_image)
  metrics = retrieval_metrics(image, text, text_to_image, block=block)
  for k in (1, 5, 10):
    t2i, i2t = brute_force_recalls(image, text, text_to_image, k)
    assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
    assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)


def test_ties_are_broken_by_index_not_in_favour_of_the_positive():
  # Every score equal: a degenerate model must get chance-level recall, not 100%.
  metrics = retrieval_metrics(np.ones((10, 4)), np.ones((20, 4)), np.repeat(np.arange(10), 2))
  assert metrics["image_retrieval_recall@1"] == pytest.approx(0.1)
  assert metrics["text_retrieval_recall@1"] == pytest.approx(0.1)
  # Duplicate captions (identical embeddings) of two images: the lower index wins the tie.
  image = np.eye(3, dtype=np.float32)
  text = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]], np.float32)
  metrics = retrieval_metrics(image, text, np.array([0, 1, 2]))
  assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)


def test_perfect_embeddings_give_full_recall_and_table_prints():
  x = np.eye(6, dtype=np.float32)
  metrics = retrieval_metrics(x, x, np.arange(6))
  assert all(v == 1.0 for v in metrics.values())
  assert "| text->image | 100.0 | 100.0 | 100.0 |" in format_table(metrics)


def test_rejects_images_without_captions_and_mismatched_labels():
  with pytest.raises(ValueError, match="no caption"):
    retrieval_metrics(np.eye(3), np.eye(3)[:2], np.array([0, 1]))
  with pytest.raises(ValueError, match="labels"):
    retrieval_metrics(np.eye(3), np.eye(3), np.array([0, 1]))
