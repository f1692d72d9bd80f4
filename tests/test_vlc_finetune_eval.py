"""VLC's fine-tuned models evaluated (evaluation/tasks/, their readers in
input_pipeline/finetune_data.py): the official metric files, classification and
ITM-retrieval wiring, and end to end through the trainer: a short VLC pretraining of the
demo, fine-tuned on the generated VQA set, beats the majority answer; fine-tuned on the
generated NLVR2 set, it reports NLVR2's metrics (its margin over the majority label
needs the demo's scale: test_nlvr2_fine_tunes...); retrieval re-ranks a dual encoder's
shortlist (a tiny CLIP run)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from clu import metric_writers
from PIL import Image

from tests.configs import tiny
from tests.test_vlc_finetune import (
  TOKENS,
  WordTokenizer,
  create_task,
  init,
  task_method,
  tiny_config,
)
from vlp_jax import evaluation, sharding, trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import demo, demo_nlvr2, demo_vqa
from vlp_jax.configs.run_config import from_values
from vlp_jax.evaluation import nlvr2, readers, vqa
from vlp_jax.evaluation import tasks as eval_tasks
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks.itm_retrieval import ItmRetrievalTask
from vlp_jax.evaluation.tasks.nlvr2 import Nlvr2Task, builtin_statement_kind
from vlp_jax.evaluation.tasks.shortlist import load_dual_encoder
from vlp_jax.evaluation.tasks.vqa import VqaTask
from vlp_jax.input_pipeline import builtin_nlvr2, finetune_data
from vlp_jax.input_pipeline.image_sources import ImageRef
from vlp_jax.methods import (
  DataContext,
)

# ---------------------------------------------------------------- evaluation files


def mesh_embedder(tokenizer, batch_size: int = 16) -> Embedder:
  return Embedder(
    {},
    sharding.create_mesh({"data": -1}),
    tokenizer,
    batch_size=batch_size,
    image_size=32,
    read_threads=2,
  )


@pytest.fixture(scope="module")
def builtin_sets(tmp_path_factory):
  return finetune_data.BuiltinSets(str(tmp_path_factory.mktemp("tasks")), 40, 14, 32, 0)


def test_the_generated_nlvr2_set_can_keep_some_statement_kinds(tmp_path):
  sets = finetune_data.BuiltinSets(str(tmp_path), 12, 6, 32, 0, "both_colour")
  _, train = finetune_data.read_nlvr2_spec("builtin", True, sets)
  _, everything = finetune_data.read_nlvr2_spec(
    "builtin", True, dataclasses.replace(sets, nlvr2_statements="")
  )
  assert len(train) == 12 and sum(e.label for e in train) == 6  # One true pair per statement.
  assert all(e.sentence.startswith("both images contain a ") for e in train)
  assert any(not e.sentence.startswith("both images") for e in everything)
  with pytest.raises(ValueError, match=r"nlvr2_statements: \['colours'\] are not among"):
    finetune_data.read_nlvr2_spec(
      "builtin", True, dataclasses.replace(sets, nlvr2_statements="colours")
    )


def test_vqa_and_nlvr2_results_use_the_official_metrics_and_files(builtin_sets, tmp_path):
  _, train = finetune_data.read_vqa_spec("builtin", True, builtin_sets)
  _, val = finetune_data.read_vqa_spec("builtin", False, builtin_sets)
  answers = vqa.build_answer_vocab(train, 1)
  favourite = answers.index("yes")

  def vqa_logits(params, images, tokens):  # Always "yes".
    return jnp.broadcast_to(jax.nn.one_hot(favourite, len(answers)), (len(images), len(answers)))

  _, dev = finetune_data.read_nlvr2_spec("builtin", False, builtin_sets)

  def nlvr2_logits(params, left, right, tokens):  # True when the left image is brighter.
    brighter = jnp.mean(left, axis=(1, 2, 3)) > jnp.mean(right, axis=(1, 2, 3))
    return jax.nn.one_hot(brighter.astype(jnp.int32), 2)

  embedder = mesh_embedder(WordTokenizer())
  results = VqaTask("builtin-vqa", val, answers, vqa_logits).evaluate(embedder, {})
  statement_kind = builtin_statement_kind
  nlvr2_task = Nlvr2Task("builtin-nlvr2", dev, nlvr2_logits, statement_kind)
  results += nlvr2_task.evaluate(embedder, {})
  evaluation.log_and_write(results, 5, str(tmp_path), metric_writers.LoggingWriter())
  step = tmp_path / "eval" / "step_00000005"

  official = vqa.evaluate_vqa({e.question_id: "yes" for e in val}, val)
  result = json.loads((step / "builtin-vqa_vqa.json").read_text())
  assert result["task"] == "vqa" and result["metrics"]["overall"] == official["overall"] / 100
  for kind, value in official["perAnswerType"].items():
    assert result["metrics"][f"perAnswerType/{kind}"] == value / 100
  accuracy = json.loads((step / "builtin-vqa_vqa" / "vqa_accuracy.json").read_text())
  assert accuracy == {k: official[k] for k in ("overall", "perAnswerType", "perQuestionType")}
  submitted = json.loads((step / "builtin-vqa_vqa" / "vqa_results.json").read_text())
  assert submitted == [{"question_id": e.question_id, "answer": "yes"} for e in val]

  # NLVR2: the brightness rule's predictions, scored as the script scores them.
  brightness = {}
  for e in dev:
    left, right = (
      np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in (e.left, e.right)
    )
    brightness[e.identifier] = left.mean() > right.mean()
  lines = (step / "builtin-nlvr2_nlvr2" / "nlvr2_predictions.csv").read_text().splitlines()
  assert len(lines) == len(dev) and lines[0].split(",")[0] == dev[0].identifier
  predicted = {i: p == "True" for i, p in (line.split(",") for line in lines)}
  script = nlvr2.evaluate_nlvr2(predicted, dev)
  result = json.loads((step / "builtin-nlvr2_nlvr2.json").read_text())["metrics"]
  assert result["accuracy"] == script["accuracy"] / 100
  assert result["consistency"] == script["consistency"] / 100
  by_kind = nlvr2.accuracy_by_group(predicted, dev, statement_kind)
  assert set(by_kind) <= set(builtin_nlvr2.STATEMENT_KINDS) and len(by_kind) >= 3
  assert all(result[f"accuracy/{k}"] == pytest.approx(v / 100) for k, v in by_kind.items())
  agree = np.mean([predicted[k] == v for k, v in brightness.items()])
  assert agree > 0.8  # Resizing differs slightly from the pipeline's, not the rule.
  files = json.loads((step / "builtin-nlvr2_nlvr2" / "nlvr2_accuracy.json").read_text())
  assert {"accuracy", "consistency"} <= set(files)


def grey_gallery(root) -> readers.RetrievalSet:
  """6 grey images (brightness 40 x i) with 1 or 2 captions naming i: 9 texts."""
  images, captions = [], []
  for i in range(6):
    path = root / f"{i}.png"
    Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(path)
    images.append(ImageRef(str(path)))
    captions.append([f"{i}", f"{i} again"] if i % 2 else [f"{i}"])
  return readers.RetrievalSet("grey", images, captions)


def test_itm_retrieval_scores_every_pair_with_the_match_head(tmp_path):
  data = grey_gallery(tmp_path)

  def match_score(params, pixels, tokens):  # The caption's number against the brightness.
    return -jnp.abs(jnp.mean(pixels, axis=(1, 2, 3)) / 40 - (tokens[:, 1] - 5))

  fns = {"match_image": lambda params, pixels: pixels, "match_score": match_score}
  task = ItmRetrievalTask(data, fns, (1, 5))
  (result,) = task.evaluate(mesh_embedder(WordTokenizer()), {})
  assert result.task == "itm_retrieval" and result.metrics["num_texts"] == 9
  assert (
    result.metrics["image_retrieval_recall@1"] == result.metrics["text_retrieval_recall@1"] == 1
  )


@pytest.fixture(scope="module")
def clip_run(cache_dir, tmp_path_factory) -> str:
  """A dual encoder as the trainer saves it: tests/configs/tiny.py's CLIP, two steps."""
  workdir = str(tmp_path_factory.mktemp("clip_run"))
  config = tiny.get_config(f"cache_dir={cache_dir},steps=2")
  config.unlock()
  config.eval.tasks = ""  # Only the saved run is needed, not its evaluation.
  trainer.train_and_evaluate(config, workdir)
  return workdir


def test_a_shortlist_of_the_whole_gallery_ranks_as_every_pair(clip_run, tmp_path):
  data = grey_gallery(tmp_path)
  method = task_method("retrieval")
  params = init(method, seed=3)  # A random rank head: scores without ties, far from perfect.
  embedder = mesh_embedder(WordTokenizer())
  every_pair = ItmRetrievalTask(data, method.predict_fns(), (1, 2, 5))
  (expected,) = every_pair.evaluate(embedder, params)
  shortlist = load_dual_encoder(clip_run, run_config=from_values)
  whole = ItmRetrievalTask(data, method.predict_fns(), (1, 2, 5), shortlist, 9)
  (got,) = whole.evaluate(embedder, params)
  assert got.metrics["rerank_k"] == 6  # k is capped by the gallery: 6 images, 9 texts.
  recalls = [k for k in expected.metrics if "recall" in k]
  assert 0 < expected.metrics["image_retrieval_recall@1"] < 1
  assert {k: got.metrics[k] for k in recalls} == {k: expected.metrics[k] for k in recalls}


def test_a_match_outside_the_shortlist_is_a_miss(clip_run, tmp_path):
  data = grey_gallery(tmp_path)

  def match_score(params, pixels, tokens):  # Perfect: the caption's number is the brightness.
    return -jnp.abs(jnp.mean(pixels, axis=(1, 2, 3)) / 40 - (tokens[:, 1] - 5))

  fns = {"match_image": lambda params, pixels: pixels, "match_score": match_score}
  embedder = mesh_embedder(WordTokenizer())
  shortlist = load_dual_encoder(clip_run, run_config=from_values)
  texts = [c for captions in data.captions for c in captions]
  owner = np.repeat(np.arange(6), [len(c) for c in data.captions])
  image_emb, text_emb = shortlist.embed(embedder, data.images, texts)
  # The CLIP's own nearest image of each text: a hit exactly when it is the right one.
  nearest = np.argsort(-(text_emb @ image_emb.T), axis=1, kind="stable")[:, 0]
  in_shortlist = np.mean(nearest == owner)
  task = ItmRetrievalTask(data, fns, (1, 5), shortlist, 1)
  (result,) = task.evaluate(embedder, {})
  assert in_shortlist < 1  # Two steps of training: some true images are not shortlisted.
  # Re-ranking is perfect, so only the shortlist misses; recall@5 gets none of them back.
  assert result.metrics["image_retrieval_recall@1"] == pytest.approx(in_shortlist)
  assert result.metrics["image_retrieval_recall@5"] == pytest.approx(in_shortlist)
  (every_pair,) = ItmRetrievalTask(data, fns, (1,)).evaluate(embedder, {})
  assert every_pair.metrics["image_retrieval_recall@1"] == 1


def test_a_converted_clip_shortlists_as_its_run_does(clip_run, tmp_path):
  from vlp_jax.weights import convert

  params, info = convert.read_params(clip_run)
  model = info["config"]["model"]
  image, text = model["image"], model["text"]
  fields = {
    "image": {k: image[k] for k in ("variant", "image_size", "width", "depth", "num_heads")}
    | {"mlp_dim": image["mlp_dim"]},
    "text": {k: text[k] for k in ("context_length", "width", "depth", "num_heads", "mlp_dim")}
    | {"vocab_size": info["tokenizer"]["vocab_size"]},
    "embed_dim": model["embed_dim"],
    "activation": model["activation"],
  }
  vocab = {"tokenizer": "wordpiece", "vocab_file": info["tokenizer"]["vocab_file"]}
  convert.save_params(str(tmp_path / "clip"), params, {"model": fields, "data": vocab})
  data = grey_gallery(tmp_path)
  texts = [c for captions in data.captions for c in captions]
  embedder = mesh_embedder(WordTokenizer())
  from_run = load_dual_encoder(clip_run, run_config=from_values).embed(embedder, data.images, texts)
  converted = load_dual_encoder(str(tmp_path / "clip")).embed(embedder, data.images, texts)
  for a, b in zip(from_run, converted):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_bad_shortlist_fails_naming_the_config_key(clip_run, pretrained_run, tmp_path):
  data = grey_gallery(tmp_path)
  fns = task_method("retrieval").predict_fns()

  def create(shortlist: str, k: int = 4):
    config = tiny_config("vlc_retrieval")
    config.eval.itm_retrieval.shortlist, config.eval.itm_retrieval.shortlist_k = shortlist, k
    config.eval.data.itm_retrieval = "heldout"
    return eval_tasks.create_tasks(
      ["itm_retrieval"], eval_tasks.Context(config, fns, None, lambda: data, from_values)
    )

  for path in (str(tmp_path / "nowhere"), str(tmp_path)):  # Missing; neither run nor CLIP.
    with pytest.raises(ConfigError, match=r"config\.eval\.itm_retrieval\.shortlist: "):
      create(path)
  with pytest.raises(
    ConfigError, match=r"config\.eval\.itm_retrieval\.shortlist: .* not a dual encoder"
  ):
    create(pretrained_run)  # A VLC run has no embeddings.
  with pytest.raises(ValueError, match=r"config\.eval\.itm_retrieval\.shortlist_k=0"):
    create(clip_run, 0)
  (task,) = create(clip_run)
  assert task.shortlist_k == 4 and task.shortlist.path == clip_run


def write_class_folders(root, classes: int = 3, per_class: int = 6) -> None:
  colours = [(250, 20, 20), (20, 250, 20), (20, 20, 250)]
  for c in range(classes):
    for split, count in (("train", per_class), ("val", 3)):
      folder = os.path.join(root, split, f"class{c}")
      os.makedirs(folder, exist_ok=True)
      for i in range(count):
        pixels = np.clip(np.asarray(colours[c]) + 3 * i, 0, 255).astype(np.uint8)
        Image.fromarray(np.broadcast_to(pixels, (40, 48, 3)).copy()).save(f"{folder}/{i}.png")


def test_classification_reads_class_folders_trains_and_scores_top1(tmp_path):
  write_class_folders(str(tmp_path))
  config = tiny_config("vlc_classify", train=str(tmp_path), crop_scale=(0.5, 1.0), flip=True)
  method = create_task("classify", config)
  assert method.model.num_outputs == 3
  assert set(method.batch_spec(8)) == {"image", "label"}
  ctx = DataContext(str(tmp_path), None, None, (), TOKENS, 8)
  batch = next(iter(method.train_data(ctx)))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert set(batch["label"].tolist()) <= {0, 1, 2} and batch["skipped"].sum() == 0
  fields = {k: batch[k] for k in ("image", "label")}
  loss, (metrics, _) = method.loss(init(method), {}, fields, jax.random.PRNGKey(0), 0)
  assert np.isfinite(loss) and "class_accuracy" in metrics

  def class_logits(params, images):  # The dominant colour channel is the class.
    return jnp.mean(images.astype(jnp.float32), axis=(1, 2))

  config.eval.data.classify_finetuned = str(tmp_path)
  ctx = eval_tasks.Context(config, {"class_logits": class_logits}, None)
  tasks = eval_tasks.create_tasks(["classify_finetuned"], ctx)
  (result,) = tasks[0].evaluate(mesh_embedder(WordTokenizer()), {})
  assert result.metrics["acc1"] == 1.0 and result.metrics["num_images"] == 9


# ---------------------------------------------------------------- end to end

# Test-size demo: 32 px scenes (16 patches), width 64, 2 blocks; the built-in captions of
# tests/configs/tiny.py, so a full run generates them once.
SIZE = dict(image_size=32, width=64, depth=2, num_heads=4, mlp_dim=128)


def shrink(config: ml_collections.ConfigDict, cache_dir: str) -> ml_collections.ConfigDict:
  config.unlock()
  for key, value in SIZE.items():
    config.model.image[key] = value
  config.vlc.decoder_width, config.vlc.decoder_depth = 32, 1
  config.vlc.decoder_num_heads, config.vlc.decoder_mlp_dim = 2, 64
  config.data.cache_dir = cache_dir
  config.data.num_workers = 0
  builtin = config.data.builtin
  builtin.num_train, builtin.num_heldout, builtin.image_size = 256, 64, 32
  config.eval.batch_size = 64
  config.log_every_steps = 10
  return config


@pytest.fixture(scope="module")
def pretrained_run(cache_dir, tmp_path_factory) -> str:
  """One short VLC pretraining of the demo, shared by both fine-tunings."""
  workdir = str(tmp_path_factory.mktemp("vlc_pretrain"))
  config = shrink(demo.get_config("method=vlc,steps=40,batch_size=32"), cache_dir)
  config.optim.warmup_steps = 4
  trainer.train_and_evaluate(config, workdir)
  return workdir


def fine_tune(config_module, task: str, pretrained: str, cache_dir: str, workdir: str, **args):
  arg = ",".join(f"{k}={v}" for k, v in {"pretrained": pretrained, **args}.items())
  config = shrink(config_module.get_config(arg), cache_dir)
  config.finetune.builtin.image_size = 32
  trainer.train_and_evaluate(config, workdir)
  (path,) = glob.glob(os.path.join(workdir, "eval", "step_*", f"*_{task}.json"))
  with open(path) as f:
    return config, json.load(f)["metrics"]


def test_vqa_fine_tuning_beats_the_majority_answer(pretrained_run, cache_dir, tmp_path):
  args = dict(steps=200, batch_size=32, num_train=400, num_eval=100)
  config, metrics = fine_tune(demo_vqa, "vqa", pretrained_run, cache_dir, str(tmp_path), **args)
  builtin = finetune_data.BuiltinSets.from_config(config)
  _, train = finetune_data.read_vqa_spec("builtin", True, builtin)
  _, val = finetune_data.read_vqa_spec("builtin", False, builtin)
  baseline = vqa.majority_baseline(train, val) / 100
  per_type = vqa.majority_baseline(train, val, by="question_type") / 100
  print(
    f"VQA accuracy {metrics['overall']:.3f}; majority answer {baseline:.3f}, "
    f"majority answer per question type {per_type:.3f}"
  )
  assert metrics["overall"] > baseline + 0.15
  assert os.path.isfile(
    glob.glob(str(tmp_path / "eval" / "step_*" / "*_vqa" / "vqa_results.json"))[0]
  )


def test_nlvr2_fine_tunes_from_the_pretraining_run_and_reports_its_metrics(
  pretrained_run, cache_dir, tmp_path
):
  """The whole path (pretraining checkpoint -> two-pass head -> official metrics) at smoke
  size. Held-out accuracy is printed, not asserted: no CI-sized run clears chance reliably
  (measured 2026-12-07, AMD EPYC, 2 shared cores). The pooled [CLS] state hardly depends
  on the input at this size: its per-dimension spread over a batch is 0.008 (of |0.12|)
  after the 40-step pretraining, as at random init, and the pretraining's ITM stays at
  ln 2 for 300 steps (200 unmasked). So the head alone on those frozen features stays at
  chance, and the whole model must first escape a plateau in which the logits' spread
  falls to ~1e-4: colour statements alone ("both_colour", 1,000 examples, batch 32,
  lr 1e-3, lr_decay 1.0) gave dev 50-58% after 300 steps; after 600, 70.5 / 63.5 / 62.5%
  (fine-tune seeds 0-2, one device) but 57.0% in this test's harness (8 devices; 222 s against
  this test's ~35-56 s); batch 16, head lr x10 or lr 3e-3 collapse and stay at 50%."""
  args = dict(steps=10, batch_size=32, num_train=64, num_eval=32)
  config, metrics = fine_tune(demo_nlvr2, "nlvr2", pretrained_run, cache_dir, str(tmp_path), **args)
  builtin = finetune_data.BuiltinSets.from_config(config)
  _, train = finetune_data.read_nlvr2_spec("builtin", True, builtin)
  _, dev = finetune_data.read_nlvr2_spec("builtin", False, builtin)
  baseline = nlvr2.majority_baseline(train, dev) / 100
  by_kind = {k.split("/")[1]: round(v, 3) for k, v in metrics.items() if "accuracy/" in k}
  print(
    f"NLVR2 accuracy {metrics['accuracy']:.3f} (consistency {metrics['consistency']:.3f}); "
    f"majority label {baseline:.3f}; by statement kind {by_kind}"
  )
  assert by_kind and set(by_kind) <= set(builtin_nlvr2.STATEMENT_KINDS)
  assert metrics["num_examples"] == 32 and metrics["num_sentences"] == 16
  assert 0 <= metrics["consistency"] <= metrics["accuracy"] <= 1
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert np.isfinite([entry["nlvr2_loss"] for entry in logged]).all()
