"""Evaluation end to end against CLIP_benchmark: one open_clip checkpoint, one set of
image files, the same reported numbers.

A randomly initialised open_clip model (a 2-block ViT at 32 px and a 2-block text tower)
is saved as an open_clip "local-dir" (open_clip_config.json + open_clip_model.safetensors).
CLIP_benchmark loads it with its own loader (open_clip's model, eval transform and
tokenizer), reads a Flickr-format caption file with its own dataset builder and a class
folder tree with torchvision's ImageFolder, and scores them with its own
zeroshot_retrieval / zeroshot_classification `evaluate`. We import the same file into our
CLIP and run eval.py's path: create_evaluator (our readers, our clip_bpe tokenizer over
open_clip's merges, the Embedder on the 8-device mesh), the tasks, the result JSON files.

Compared: every image and text embedding (1e-5), the zero-shot logits, and every metric.
The images are JPEG and PNG (RGB, grey, palette), square and not, smaller and larger than
the model's input, so the preprocessing (resize of the shorter side, center crop, bicubic)
is compared too. Not RGBA: we composite transparency on white (image_ops.to_rgb), PIL's
convert("RGB") on their side drops the alpha channel. The test checks that no positive is
nearly tied with another score, so the tie-breaking of the two sides (torch.topk's order
vs ours by index) never decides: the metrics are equal, not merely close.
"""

from __future__ import annotations

import importlib.resources
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
open_clip_lib = pytest.importorskip("open_clip")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("clip_benchmark")

from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval  # noqa: E402
from clip_benchmark.models.open_clip import load_open_clip  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from tests.configs import tiny  # noqa: E402
from tests.test_eval_metrics import numpy2_scalars  # noqa: E402, F401 (a fixture)
from vlp_jax import evaluation, sharding  # noqa: E402
from vlp_jax.evaluation import classification, report  # noqa: E402
from vlp_jax.input_pipeline import tokenizers  # noqa: E402
from vlp_jax.models import embedding_fns  # noqa: E402
from vlp_jax.weights import convert, open_clip  # noqa: E402

CLIP_MERGES = str(importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz")
IMAGE_SIZE = 32
MODEL_CFG = {
  "embed_dim": 24,
  "vision_cfg": {
    "image_size": IMAGE_SIZE,
    "layers": 2,
    "width": 48,
    "head_width": 16,
    "patch_size": 8,
  },
  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
KS = [1, 5, 10]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}."]
CLASSNAMES = ["apple", "bicycle", "cloud", "dog", "lighthouse", "teapot"]
# (width, height): square, landscape, portrait; smaller, equal and up to 4x larger than
# the 32 px input; odd sizes where torchvision's rounding of the crop offset matters.
SIZES = [
  (32, 32),
  (80, 60),
  (60, 80),
  (100, 41),
  (33, 70),
  (24, 24),
  (64, 50),
  (45, 45),
  (70, 33),
  (50, 64),
  (120, 90),
  (41, 100),
]
TOLERANCE = 1e-5


# ------------------------------------------------------------------------------- data


def _image(rng: np.random.Generator, size: tuple[int, int], tint: np.ndarray) -> Image.Image:
  """Smooth random texture (upsampled noise) with a tint: detail at every scale."""
  width, height = size
  noise = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3)).astype(np.float64)
  noise = np.clip(0.6 * noise + 0.4 * tint, 0, 255).astype(np.uint8)
  return Image.fromarray(noise).resize((width, height), Image.BILINEAR)


def _save(image: Image.Image, path: str, kind: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if kind == "grey":
    image = image.convert("L")
  elif kind == "palette":
    image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
  image.save(path, "JPEG" if path.endswith(".jpg") else "PNG", quality=90)


def _caption(rng: np.random.Generator) -> str:
  parts = [
    ["A", "a", "Two", "One old", "Some"],
    ["red", "tiny", "striped", "wet", "shiny", "blue-ish"],
    ["dog", "bicycle", "teapot", "cloud", "man", "kite"],
    ["sits", "is leaning", "waits", "flies", "rests quietly"],
    ["on the beach.", "near a lighthouse!", "in the snow", "under a tree, at noon.", "outside"],
  ]
  return " ".join(str(rng.choice(p)) for p in parts)


def write_datasets(root: str) -> dict[str, str]:
  """A Flickr-format retrieval set (24 JPEGs, 1-3 captions each) and a class-folder
  classification set (6 classes x 5 images, PNG and JPEG; a grey and a palette image)."""
  rng = np.random.default_rng(0)
  lines, captions = ["image,caption"], set()
  for i in range(24):
    name = f"img{i:02d}.jpg"
    _save(_image(rng, SIZES[i % len(SIZES)], rng.integers(0, 256, 3)), f"{root}/flickr/{name}", "")
    for _ in range(1 + i % 3):
      caption = _caption(rng)
      while caption in captions:  # no duplicate captions: their scores would tie
        caption = _caption(rng)
      captions.add(caption)
      lines.append(f"{name},{caption}")
  with open(f"{root}/flickr/captions_test.txt", "w") as f:
    f.write("\n".join(lines) + "\n")
  for c, name in enumerate(CLASSNAMES):
    tint = rng.integers(0, 256, 3)
    for i in range(5):
      ext = "jpg" if (c + i) % 2 else "png"
      kind = {(1, 2): "grey", (4, 2): "palette"}.get((c, i), "")
      image = _image(rng, SIZES[(3 * c + i) % len(SIZES)], tint)
      _save(image, f"{root}/objects/test/{name}/{i}.{ext}", kind)
  with open(f"{root}/templates.txt", "w") as f:
    f.write("\n".join(TEMPLATES) + "\n")
  return {
    "captions": f"{root}/flickr/captions_test.txt",
    "images": f"{root}/flickr",
    "classes": f"{root}/objects",
    "templates": f"{root}/templates.txt",
  }


def write_open_clip_dir(directory: str) -> None:
  """A random open_clip model as a "local-dir": its config and its weights."""
  os.makedirs(directory)
  with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": MODEL_CFG, "preprocess_cfg": {}}, f)
  torch.manual_seed(0)
  model = open_clip_lib.create_model(f"local-dir:{directory}")
  state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
  safetensors_torch.save_file(state_dict, os.path.join(directory, "open_clip_model.safetensors"))


# ------------------------------------------------------------------------ both sides


class Recording(torch.nn.Module):
  """The open_clip model as CLIP_benchmark sees it, keeping what it returned."""

  def __init__(self, model):
    super().__init__()
    self.model, self.images, self.texts = model, [], []

  def encode_image(self, images):
    out = self.model.encode_image(images)
    self.images.append(out.detach().numpy().copy())
    return out

  def encode_text(self, tokens):
    out = self.model.encode_text(tokens)
    self.texts.append(out.detach().numpy().copy())
    return out

  def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
    image, text = np.concatenate(self.images), np.concatenate(self.texts)
    self.images, self.texts = [], []
    return unit(image), unit(text)


def positive_margin(scores: np.ndarray, positives: np.ndarray) -> float:
  """The smallest difference between a positive's score and another score of its row:
  where it is above the two sides' numerical differences, their rankings agree."""
  gaps = np.abs(scores[:, :, None] - scores[:, None, :])
  others = positives[:, :, None] & ~np.eye(scores.shape[1], dtype=bool)
  return float(gaps[others].min())


def unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_benchmark_side(model_dir: str, data: dict[str, str], monkeypatch) -> dict:
  model, transform, tokenizer = load_open_clip(f"local-dir:{model_dir}", None, device="cpu")
  recording = Recording(model.eval())
  retrieval_set = build_dataset(
    "flickr30k",
    root=data["images"],
    transform=transform,
    split="test",
    annotation_file=data["captions"],
    download=False,
    task="zeroshot_retrieval",
  )
  loader = torch.utils.data.DataLoader(
    retrieval_set, batch_size=8, collate_fn=get_dataset_collate_fn("flickr30k")
  )
  retrieval = zeroshot_retrieval.evaluate(
    recording, loader, tokenizer, "cpu", amp=False, recall_k_list=KS
  )
  retrieval_emb = recording.embeddings()

  logits = []
  run_classification = zeroshot_classification.run_classification

  def recorded_run(*args, **kwargs):
    found = run_classification(*args, **kwargs)
    logits.append(found[0].numpy())
    return found

  monkeypatch.setattr(zeroshot_classification, "run_classification", recorded_run)
  folders = ImageFolder(os.path.join(data["classes"], "test"), transform=transform)
  assert folders.classes == CLASSNAMES
  classes = zeroshot_classification.evaluate(
    recording,
    torch.utils.data.DataLoader(folders, batch_size=8),
    tokenizer,
    folders.classes,
    TEMPLATES,
    "cpu",
    amp=False,
  )
  image_emb, text_emb = recording.embeddings()
  return {
    "zeroshot_retrieval": retrieval,
    "zeroshot_classification": classes,
    "retrieval_emb": retrieval_emb,
    "classification_emb": (image_emb, text_emb),  # text: class-major, as our prompts
    "logits": logits[0],
  }


def our_side(model_dir: str, data: dict[str, str], workdir: str, monkeypatch) -> dict:
  fields = open_clip.config_from_open_clip(
    model_dir,
    activation="gelu",
    image_heads=MODEL_CFG["vision_cfg"]["width"] // MODEL_CFG["vision_cfg"]["head_width"],
    text_heads=MODEL_CFG["text_cfg"]["heads"],
  )
  model = convert.model_from_fields(fields)
  params = open_clip.import_open_clip(model_dir, model)
  config = tiny.get_config()
  config.unlock()
  convert.update_model_config(config.model, fields)
  config.eval.batch_size = 16
  config.eval.recall_ks = tuple(KS)
  config.eval.data.zeroshot_retrieval = f"{data['captions']},images={data['images']}"
  config.eval.data.zeroshot_classification = f"{data['classes']},templates={data['templates']}"
  tokenizer = tokenizers.create_tokenizer("clip_bpe", CLIP_MERGES, 77)
  mesh = sharding.create_mesh(config.mesh.to_dict())
  evaluator = evaluation.create_evaluator(
    config,
    embedding_fns(model),
    mesh,
    tokenizer,
    [],
    tasks=["zeroshot_retrieval", "zeroshot_classification"],
  )
  embedder, embedded, logits = evaluator.embedder, [], []
  for method in ("images", "texts"):
    original = getattr(embedder, method)

    def record(*args, _original=original, **kwargs):
      found = _original(*args, **kwargs)
      embedded.append(found)
      return found

    monkeypatch.setattr(embedder, method, record)
  zeroshot_logits = classification.zeroshot_logits

  def recorded_logits(*args):
    found = zeroshot_logits(*args)
    logits.append(found)
    return found

  monkeypatch.setattr(classification, "zeroshot_logits", recorded_logits)
  results = evaluator.evaluate(params)
  # The reported numbers: the CLIP_benchmark-style JSON files eval.py writes.
  paths = report.write_results(results, 0, workdir, evaluator.model_name, model_dir)
  reported = {}
  for path in paths:
    with open(path) as f:
      found = json.load(f)
    reported[found["task"]] = found["metrics"]
  retrieval_image, retrieval_text, class_text, class_image = embedded
  return {
    **reported,
    "retrieval_emb": (retrieval_image, retrieval_text),
    "classification_emb": (class_image, class_text),
    "logits": logits[0],
  }


# ------------------------------------------------------------------------------- test


@pytest.mark.usefixtures("numpy2_scalars")
def test_evaluation_equals_clip_benchmark_on_the_same_open_clip_model_and_files(
  tmp_path, monkeypatch
):
  data = write_datasets(str(tmp_path / "data"))
  model_dir = str(tmp_path / "open_clip_model")
  write_open_clip_dir(model_dir)
  theirs = clip_benchmark_side(model_dir, data, monkeypatch)
  ours = our_side(model_dir, data, str(tmp_path / "eval"), monkeypatch)

  for key in ("retrieval_emb", "classification_emb"):
    for mine, reference in zip(ours[key], theirs[key], strict=True):
      assert mine.shape == reference.shape, key
      np.testing.assert_allclose(mine, reference, atol=TOLERANCE, err_msg=key)
  assert ours["retrieval_emb"][0].shape == (24, 24)  # 24 images
  assert ours["retrieval_emb"][1].shape == (48, 24)  # 1-3 captions each
  assert ours["classification_emb"][1].shape == (len(CLASSNAMES) * len(TEMPLATES), 24)
  np.testing.assert_allclose(ours["logits"], theirs["logits"], atol=100 * TOLERANCE)

  # No near-ties at the positives: every positive's score is further from any other score
  # of its ranking than twice the largest difference between the two sides' scores, so
  # both rank the positives alike (and ties, broken by torch.topk's order on one side and
  # by index on ours, never decide): the metrics must be equal.
  scores = ours["retrieval_emb"][1] @ ours["retrieval_emb"][0].T
  their_scores = theirs["retrieval_emb"][1] @ theirs["retrieval_emb"][0].T
  text_to_image = np.repeat(np.arange(24), 1 + np.arange(24) % 3)
  own = text_to_image[:, None] == np.arange(24)
  error = np.abs(scores - their_scores).max()
  assert positive_margin(scores, own) > 2 * error
  assert positive_margin(scores.T, own.T) > 2 * error
  labels = np.repeat(np.arange(len(CLASSNAMES)), 5)
  error = np.abs(ours["logits"] - theirs["logits"]).max()
  assert positive_margin(ours["logits"], labels[:, None] == np.arange(len(CLASSNAMES))) > 2 * error

  retrieval = ours["zeroshot_retrieval"]
  assert set(retrieval) >= set(theirs["zeroshot_retrieval"])
  for key, value in theirs["zeroshot_retrieval"].items():
    assert retrieval[key] == pytest.approx(value, rel=1e-6), key  # theirs: a float32 mean
  assert 0 < retrieval["image_retrieval_recall@10"] < 1
  assert 0 < retrieval["text_retrieval_recall@10"] < 1
  assert retrieval["num_images"] == 24 and retrieval["num_texts"] == 48

  classes = ours["zeroshot_classification"]
  assert set(classes) == set(theirs["zeroshot_classification"])
  for key, value in theirs["zeroshot_classification"].items():
    assert classes[key] == pytest.approx(value, rel=1e-9), key
  assert 0 < classes["acc1"] < classes["acc5"] < 1
  assert jax.device_count() == 8  # the embedder ran sharded over the simulated mesh
