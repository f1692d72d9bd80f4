"""Our metrics against CLIP_benchmark's own functions, fed the same embeddings.

CLIP_benchmark's evaluate() functions take a model with encode_image/encode_text, a
dataloader and a tokenizer: here a lookup model returns fixed embeddings, so both sides
score exactly the same vectors.
"""

import types

import numpy as np
import pytest
import torch
from clip_benchmark.metrics import (
  image_caption_selection,
  zeroshot_classification,
  zeroshot_retrieval,
)
from clip_benchmark.metrics import linear_probe as cb_linear_probe
from sklearn.metrics import balanced_accuracy_score

from vlp_jax.evaluation import classification, compositional, linear_probe
from vlp_jax.evaluation.retrieval import retrieval_metrics


class LookupModel(torch.nn.Module):
  """Images are tensors holding a row index; texts are token rows holding one."""

  def __init__(self, image_emb: np.ndarray, text_emb: np.ndarray):
    super().__init__()
    self.image_emb = torch.tensor(image_emb)
    self.text_emb = torch.tensor(text_emb)

  def encode_image(self, images):
    return self.image_emb[images.reshape(len(images), -1)[:, 0].long()]

  def encode_text(self, tokens):
    return self.text_emb[tokens[:, 0]]


@pytest.fixture
def numpy2_scalars(monkeypatch):
  """CLIP_benchmark 1.6.2's `accuracy` calls float() on a 1-element 1-D array, which
  numpy 2.4 refuses; hand it the 0-d array older numpy converted implicitly. Only the
  conversion changes: their metric code runs as shipped."""
  original = torch.Tensor.numpy

  def numpy(self, *args, **kwargs):
    array = original(self, *args, **kwargs)
    return array.reshape(()) if array.shape == (1,) else array

  monkeypatch.setattr(torch.Tensor, "numpy", numpy)


def lookup_tokenizer(texts_to_row: dict[str, int]):
  return lambda texts: torch.tensor([[texts_to_row[t]] for t in texts])


def unit(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def retrieval_case(seed: int):
  """Random embeddings, 1-4 captions per image, and ties that CLIP_benchmark's
  torch.topk resolves the same whatever its order: duplicate captions of one image
  (tied positives), identical captions of two images and a duplicated image, both
  placed far below the top 10 for their own images (tied negatives for the others)."""
  rng = np.random.default_rng(seed)
  num_images, dim = 30, 16
  images = unit(rng.normal(size=(num_images, dim)))
  images[7] = images[6]  # a duplicated image
  counts = rng.integers(1, 5, num_images)
  text_to_image = np.repeat(np.arange(num_images), counts)
  texts = unit(rng.normal(size=(len(text_to_image), dim)))
  first = np.cumsum(counts) - counts
  texts[first[3] + 1 if counts[3] > 1 else first[3]] = texts[first[3]]  # duplicate caption
  far = unit(-(images[6] + images[10] + images[11]))
  for image in (6, 7, 10, 11):  # own captions far from their images
    texts[text_to_image == image] = far
  return images, texts, text_to_image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_equals_clip_benchmark(seed):
  images, texts, text_to_image = retrieval_case(seed)
  ks = [1, 5, 10]
  ours = retrieval_metrics(images, texts, text_to_image, ks, block=7)
  names = {f"t{i}": i for i in range(len(texts))}
  loader = []
  for start in range(0, len(images), 8):  # batches of 8 images with their captions
    rows = range(start, min(start + 8, len(images)))
    batch_texts = [[f"t{t}" for t in np.flatnonzero(text_to_image == i)] for i in rows]
    loader.append((torch.tensor(list(rows)).reshape(-1, 1), batch_texts))
  theirs = zeroshot_retrieval.evaluate(
    LookupModel(images, texts), loader, lookup_tokenizer(names), "cpu", amp=False, recall_k_list=ks
  )
  assert set(ours) >= set(theirs)
  for key, value in theirs.items():
    assert ours[key] == pytest.approx(value, rel=1e-6), key  # theirs is a float32 mean


def _classification_case(num_classes: int, seed: int):
  rng = np.random.default_rng(seed)
  classnames = [f"class{c}" for c in range(num_classes)]
  templates = ["a photo of a {c}.", "a {c} drawing.", "itap of a {c}."]
  texts, owner = classification.prompts(classnames, templates)
  text_emb = unit(rng.normal(size=(len(texts), 12)))
  labels = rng.integers(0, num_classes, 90)
  # Images near one prompt of their class, plus noise: accuracies neither 0 nor 1.
  noise = rng.normal(size=(90, 12))
  image_emb = unit(noise + 1.5 * text_emb[np.searchsorted(owner, labels)])
  return classnames, templates, texts, owner, text_emb, image_emb, labels


@pytest.mark.parametrize("num_classes", [3, 7])
def test_zeroshot_classification_equals_clip_benchmark(num_classes, numpy2_scalars):
  classnames, templates, texts, owner, text_emb, image_emb, labels = _classification_case(
    num_classes, seed=num_classes
  )
  classifier = classification.zeroshot_classifier(text_emb, owner, num_classes)
  logits = classification.zeroshot_logits(image_emb, classifier)
  ours = classification.classification_metrics(logits, labels, num_classes)

  class Loader(list):  # evaluate() reads dataloader.dataset.classes
    dataset = types.SimpleNamespace(classes=classnames)

  loader = Loader(
    (torch.arange(s, min(s + 16, 90)).reshape(-1, 1), torch.tensor(labels[s : s + 16]))
    for s in range(0, 90, 16)
  )
  theirs = zeroshot_classification.evaluate(
    LookupModel(image_emb, text_emb),
    loader,
    lookup_tokenizer({t: i for i, t in enumerate(texts)}),
    classnames,
    templates,
    "cpu",
    amp=False,
  )
  assert 0 < ours["acc1"] < 1
  for key in ("acc1", "acc5", "mean_per_class_recall"):
    if num_classes < 5 and key == "acc5":
      assert np.isnan(ours[key]) and np.isnan(theirs[key])
    else:
      assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key


def test_mean_per_class_recall_is_balanced_accuracy():
  rng = np.random.default_rng(0)
  labels = rng.choice([0, 1, 2, 4], size=200, p=[0.6, 0.25, 0.1, 0.05])  # class 3 absent
  predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 6, 200))
  with pytest.warns(UserWarning):  # sklearn: predictions of classes not in the labels
    expected = balanced_accuracy_score(labels, predictions)
  assert classification.mean_per_class_recall(labels, predictions) == pytest.approx(expected)


def test_topk_accuracy_breaks_ties_towards_the_lower_class():
  logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
  assert classification.topk_accuracy(logits, np.array([0, 2]), 1) == 0.5
  assert classification.topk_accuracy(logits, np.array([1, 2]), 2) == 1.0


def _pair_loader(num_items: int, images_per_item: int, texts_per_item: int):
  batches = []
  for start in range(0, num_items, 5):
    items = range(start, min(start + 5, num_items))
    image_rows = [[i * images_per_item + j for j in range(images_per_item)] for i in items]
    images = torch.tensor(image_rows).reshape(len(items), images_per_item, 1, 1, 1)
    texts = [[f"t{i * texts_per_item + j}" for j in range(texts_per_item)] for i in items]
    batches.append((images, texts))
  return batches


@pytest.mark.parametrize("images_per_item", [1, 2])
def test_winoground_and_sugarcrepe_equal_clip_benchmark_caption_selection(images_per_item):
  """CLIP_benchmark's image_caption_selection (its Winoground and SugarCrepe task) on
  tie-free embeddings: acc = our group score (Winoground) / accuracy (SugarCrepe)."""
  rng = np.random.default_rng(images_per_item)
  num_items = 23
  image_emb = unit(rng.normal(size=(num_items * images_per_item, 6)))
  text_emb = unit(rng.normal(size=(num_items * 2, 6)))
  theirs = image_caption_selection.evaluate(
    LookupModel(image_emb, text_emb),
    _pair_loader(num_items, images_per_item, 2),
    lookup_tokenizer({f"t{i}": i for i in range(len(text_emb))}),
    "cpu",
    amp=False,
  )
  item_images = np.arange(num_items * images_per_item).reshape(num_items, images_per_item)
  item_texts = np.arange(num_items * 2).reshape(num_items, 2)
  scores = compositional.item_scores(image_emb, text_emb, item_images, item_texts)
  if images_per_item == 2:
    ours = compositional.winoground_scores(scores)
    assert ours["text_score"] == pytest.approx(theirs["text_acc"])
    assert ours["image_score"] == pytest.approx(theirs["image_acc"])
    assert ours["group_score"] == pytest.approx(theirs["acc"])
  else:
    ours = compositional.pairwise_accuracy(scores, np.array(["swap_att"] * num_items))
    assert ours["swap_att"] == pytest.approx(theirs["acc"])


def _clip_benchmark_search(accuracy_of_index, monkeypatch) -> int:
  """CLIP_benchmark's search, run through its own find_peak with training replaced by a
  table of validation accuracies (its evaluate() needs CUDA)."""
  monkeypatch.setattr(cb_linear_probe, "train", lambda _l, _i, _o, wd, *a: wd)
  grid = np.logspace(-6, 2, num=97).tolist()

  def infer(weight_decay, *_):
    acc = accuracy_of_index(grid.index(weight_decay))
    hits = round(acc * 1000)
    logits = torch.tensor([[1.0, 0.0]] * hits + [[0.0, 1.0]] * (1000 - hits))
    return logits, torch.zeros(1000)

  monkeypatch.setattr(cb_linear_probe, "infer", infer)
  coarse = [i for i, v in enumerate(grid) if v in np.logspace(-6, 2, num=7).tolist()]
  args = (None, None, 4, 2, 0.1, 1, False, "cpu", False, 0)
  peak = cb_linear_probe.find_peak(grid, coarse, *args)
  span = 8
  while span > 0:
    left, right = max(peak - span, 0), min(peak + span, len(grid) - 1)
    peak = cb_linear_probe.find_peak(grid, [left, peak, right], *args)
    span //= 2
  return peak


@pytest.mark.parametrize(
  "curve",
  [
    lambda i: 1 - abs(i - 41) / 100,  # one peak between coarse points
    lambda i: 0.5 if 20 <= i <= 60 else 0.2,  # a plateau: the first best wins
    lambda i: 0.0,  # nothing learns: index 0
    lambda i: 0.3 + 0.2 * np.sin(i / 5.0),  # several local peaks
    lambda i: i / 96,  # best at the edge of the grid
  ],
)
def test_weight_decay_search_matches_clip_benchmark(curve, monkeypatch, numpy2_scalars):
  def ours(indices):
    return [round(curve(i) * 1000) / 1000 for i in indices]

  expected = _clip_benchmark_search(curve, monkeypatch)
  assert linear_probe.search_weight_decay(ours) == expected


def test_linear_probe_learns_separable_features_like_sklearn():
  from sklearn.linear_model import LogisticRegression

  rng = np.random.default_rng(0)
  centres = rng.normal(size=(6, 16)) * 2
  y = rng.integers(0, 6, 600)
  x = unit(centres[y] + rng.normal(size=(600, 16)))
  train, val, test = (x[:300], y[:300]), (x[300:400], y[300:400]), (x[400:], y[400:])
  settings = linear_probe.ProbeSettings(lr=0.1, epochs=5, batch_size=64, seed=0)
  metrics = linear_probe.linear_probe(train, test, val, settings)
  reference = LogisticRegression(max_iter=1000).fit(*train).score(*test)
  assert metrics["lp_acc1"] >= reference - 0.05
  assert metrics["lp_acc5"] == 1.0 and 1e-6 <= metrics["weight_decay"] <= 1e2
  # CLIP_benchmark reports acc@5 only when a test label reaches 5.
  few = linear_probe.linear_probe((x[:300], y[:300] % 5), (x[400:], y[400:] % 5), None, settings)
  assert np.isnan(few["lp_acc5"]) and few["weight_decay"] == 0.0
