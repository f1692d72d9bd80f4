"""VLC's fine-tuning tasks (methods/vlc_tasks.py, evaluation/finetune.py): the VQA loss
against NumPy, NLVR2's two passes with token types 1 and 2, layer-wise learning rates,
loading a pretraining run's encoder (and its ITM head into the rank head), the official
metric files, classification and ITM-retrieval wiring, and end to end through the
trainer: a short VLC pretraining of the demo, fine-tuned on the generated VQA set, beats
the majority answer; fine-tuned on the generated NLVR2 set, it reports NLVR2's metrics
(its margin over the majority label needs the demo's scale: test_nlvr2_fine_tunes...);
retrieval re-ranks a dual encoder's shortlist (a tiny CLIP run)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from clu import metric_writers
from PIL import Image

from configs import demo, demo_nlvr2, demo_vqa
from tests.configs import tiny
from vlp_jax import evaluation, experiment, optim, sharding, trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.evaluation import finetune, nlvr2, readers, vqa
from vlp_jax.evaluation.embedding import Embedder, ImageRef
from vlp_jax.input_pipeline import builtin_tasks
from vlp_jax.methods import DataContext, MethodContext, vlc, vlc_tasks
from vlp_jax.models.single_stream import SingleStreamEncoder

TOKENS = experiment.TokenizerSpec(64, 0, 12, cls_id=2, sep_id=3, mask_id=4)


class WordTokenizer:
  """[CLS]=2, one id per word (a digit word is its own id + 5, others hashed), [SEP]=3."""

  vocab_size, pad_id, context_length, cls_id, sep_id, mask_id = 64, 0, 12, 2, 3, 4

  def __call__(self, texts):
    out = np.zeros((len(texts), self.context_length), np.int32)
    for row, text in enumerate(texts):
      words = [int(w) + 5 if w.isdigit() else 5 + sum(map(ord, w)) % 59 for w in text.split()]
      ids = [2, *words[: self.context_length - 2], 3]
      out[row, : len(ids)] = ids
    return out


def tiny_config(method: str = "vlc_vqa", **finetune_fields) -> ml_collections.ConfigDict:
  """demo.py:method=vlc at test size: 32 px, 8 px patches (16), width 32, 2 blocks."""
  config = demo.get_config("method=vlc,steps=3,batch_size=8")
  config.unlock()
  config.method = method
  image = config.model.image
  image.image_size, image.width, image.depth, image.num_heads, image.mlp_dim = 32, 32, 2, 2, 64
  config.vlc.decoder_width, config.vlc.decoder_depth = 32, 1
  config.vlc.decoder_num_heads, config.vlc.decoder_mlp_dim = 2, 64
  for key, value in finetune_fields.items():
    config.finetune[key] = value
  return config


def single_device():
  return sharding.create_mesh({"data": 1}, jax.devices()[:1])


def encoder() -> SingleStreamEncoder:
  return vlc.create_model(tiny_config(), 64, 0, 12).encoder


def task_method(task: str, num_outputs: int = 5, **fields) -> vlc_tasks.VlcTask:
  """A VlcTask without reading any data (create() reads the task's training set)."""
  answers = tuple(f"a{i}" for i in range(num_outputs)) if task == "vqa" else ()
  return vlc_tasks.VlcTask(
    model=vlc_tasks.TaskModel(encoder(), task, num_outputs),
    task=task,
    context_length=12,
    optim_config=tiny_config().optim,
    answers=answers,
    **fields,
  )


def init(method, seed: int = 0) -> dict:
  """The method's parameters as host arrays (eagerly: cheaper than compiling the init)."""
  params, _ = method.init(jax.random.PRNGKey(seed))
  return jax.tree.map(np.asarray, params)


def random_inputs(rows: int = 4, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
  tokens = np.zeros((rows, 12), np.int32)
  tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 2, rng.integers(5, 64, (rows, 5)), 3
  return images, tokens


# ---------------------------------------------------------------- losses and heads


def test_vqa_loss_is_soft_target_bce_times_the_number_of_answers():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (6, 11)).astype(np.float32)
  targets = np.zeros((6, 11), np.float32)
  targets[np.arange(6), rng.integers(0, 11, 6)] = rng.choice([0.3, 0.6, 0.9, 1.0], 6)
  targets[0, 3] = 0.3  # A row with two soft answers.
  sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(targets * np.log(sigmoid) + (1 - targets) * np.log(1 - sigmoid))
  expected = bce.mean() * 11  # ViLT: mean BCE x number of answers.
  np.testing.assert_allclose(float(vlc_tasks.vqa_loss(logits, targets)), expected, rtol=1e-5)


def test_nlvr2_runs_the_left_image_as_type_1_and_the_right_as_type_2():
  method = task_method("nlvr2")
  params = init(method)
  left, tokens = random_inputs(seed=1)
  right, _ = random_inputs(seed=2)
  logits_fn = method.predict_fns()["nlvr2_logits"]
  # A random direction per row (LayerNorm would remove a constant shift).
  shifts = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
  shifts[0] = 0

  @jax.jit  # One compilation for the recorded pass and the two perturbed ones.
  def probe(params, left, right, tokens):
    seen = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, SingleStreamEncoder) and context.method_name == "__call__":
        seen.append((args[0], args[3] if len(args) > 3 else kwargs["image_type"]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      logits = logits_fn(params, left, right, tokens)
    perturbed = []
    for row in (1, 2):
      types = params["encoder"]["token_type_embedding"]
      mask = jnp.zeros((3, 1)).at[row].set(1.0)
      changed = {
        **params,
        "encoder": {**params["encoder"], "token_type_embedding": types + mask * shifts},
      }
      perturbed.append(logits_fn(changed, left, right, tokens))
    return logits, [image for image, _ in seen], [kind for _, kind in seen], perturbed

  logits, images, types, perturbed = probe(params, left, right, tokens)
  assert logits.shape == (4, 2)
  assert [int(t) for t in types] == [1, 2]
  np.testing.assert_array_equal(images[0], left)
  np.testing.assert_array_equal(images[1], right)
  for row, changed in zip((1, 2), perturbed):  # Each type's row reaches the output.
    assert not np.allclose(changed, logits, atol=1e-6), row


def test_retrieval_negatives_are_other_rows_and_the_loss_leaves_the_itm_head_alone():
  columns = np.asarray(vlc_tasks.negative_captions(jax.random.PRNGKey(3), 8, 5))
  assert columns.shape == (8, 6)
  np.testing.assert_array_equal(columns[:, 0], np.arange(8))
  for row in columns:
    assert len(set(row.tolist())) == 6  # Distinct, never its own caption twice.

  method = task_method("retrieval", num_negatives=3, itm_weight=0.5)
  params = init(method)
  images, tokens = random_inputs(rows=4)
  schedule = optax.constant_schedule(1e-2)
  tx = optim.create_optimizer(
    method.optim_config, schedule, method.param_labels(), method.optimizer_groups(schedule)
  )
  (loss, (metrics, _)), grads = jax.jit(method.loss_and_grads)(
    params, {}, {"image": images, "tokens": tokens}, jax.random.PRNGKey(1), 0
  )
  assert np.isfinite(loss) and {"irtr_loss", "itm_loss", "irtr_accuracy"} <= set(metrics)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  jax.tree.map(np.testing.assert_array_equal, new["itm_head"], params["itm_head"])
  assert not np.allclose(new["rank_head"]["kernel"], params["rank_head"]["kernel"])
  # The default, as VLC trains (its set_task drops the 0.5 x ITM): the rank loss alone.
  default = task_method("retrieval", num_negatives=3)
  _, (metrics, _) = jax.eval_shape(
    default.loss, params, {}, {"image": images, "tokens": tokens}, jax.random.PRNGKey(1), 0
  )
  assert default.itm_weight == 0 and set(metrics) == {"loss", "irtr_loss", "irtr_accuracy"}


# ---------------------------------------------------------------- optimizer


def test_layerwise_decay_and_head_multiplier_give_each_layer_its_learning_rate():
  lr, decay, multiplier = 1e-3, 0.5, 10.0
  method = task_method("vqa", lr_decay=decay, head_lr_multiplier=multiplier)
  params = init(method)
  config = ml_collections.ConfigDict(
    {"grad_clip_norm": 1e9, "b1": 0.9, "b2": 0.98, "eps": 1e-12, "weight_decay": 0.0}
  )
  method = dataclasses.replace(method, optim_config=config)  # No clipping, no decay.
  schedule = optax.constant_schedule(lr)
  groups = method.optimizer_groups(schedule)
  tx = optim.create_optimizer(config, schedule, method.param_labels(), groups)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  step = jax.tree.map(lambda u: float(-np.asarray(u).ravel()[0]), updates)  # Adam: lr x scale.
  encoder = step["encoder"]
  # depth 2: embeddings decay^3, block 0 decay^2, block 1 decay^1, the rest 1.
  np.testing.assert_allclose(encoder["conv1"]["kernel"], lr * decay**3, rtol=1e-5)
  np.testing.assert_allclose(encoder["token_type_embedding"], lr * decay**3, rtol=1e-5)
  np.testing.assert_allclose(
    encoder["text_embed"]["token_embedding"]["embedding"], lr * decay**3, rtol=1e-5
  )
  block = encoder["transformer"]
  np.testing.assert_allclose(
    block["resblocks_0"]["attn"]["in_proj"]["kernel"], lr * decay**2, rtol=1e-5
  )
  np.testing.assert_allclose(block["resblocks_1"]["mlp"]["c_fc"]["bias"], lr * decay, rtol=1e-5)
  np.testing.assert_allclose(encoder["ln_post"]["scale"], lr, rtol=1e-5)
  np.testing.assert_allclose(step["pooler"]["kernel"], lr, rtol=1e-5)
  np.testing.assert_allclose(step["vqa_head"]["dense_1"]["kernel"], lr * multiplier, rtol=1e-5)


# ---------------------------------------------------------------- pretrained parameters


@pytest.fixture(scope="module")
def pretraining_params() -> dict:
  """A VLC pretraining model's parameters (what a pretraining run's checkpoint holds)."""
  return init(vlc.create(MethodContext(tiny_config("vlc"), single_device(), TOKENS, 10)), 7)


def test_a_pretraining_run_gives_encoder_and_pooler_and_its_itm_head_the_rank_head(
  pretraining_params,
):
  source = pretraining_params
  for task in ("vqa", "nlvr2", "retrieval", "classify"):
    method = task_method(task)
    fresh = init(method)
    loaded = vlc_tasks.transfer_pretrained(fresh, source, task)
    assert jax.tree.structure(loaded) == jax.tree.structure(fresh), task
    types = np.array(source["encoder"]["token_type_embedding"])
    if task == "nlvr2":  # The second image's type starts as the first image's.
      types[2] = types[1]
    got = {**loaded["encoder"], "token_type_embedding": types}
    jax.tree.map(np.testing.assert_array_equal, loaded["encoder"], got)
    jax.tree.map(
      np.testing.assert_array_equal,
      {k: v for k, v in loaded["encoder"].items() if k != "token_type_embedding"},
      {k: v for k, v in source["encoder"].items() if k != "token_type_embedding"},
    )
    if task != "classify":
      jax.tree.map(np.testing.assert_array_equal, loaded["pooler"], source["pooler"])
    for head in set(fresh) & set(vlc_tasks.NEW_HEADS):  # New heads stay new.
      jax.tree.map(np.testing.assert_array_equal, loaded[head], fresh[head])
    assert "decoder" not in loaded and "mlm_head" not in loaded

  # The rank head starts as the ITM head's "matched" logit.
  method = task_method("retrieval")
  params = vlc_tasks.transfer_pretrained(init(method), source, "retrieval")
  images, tokens = random_inputs()
  score = method.predict_fns()["match_score"](params, images, tokens)
  pretrained_vlc = vlc.create(MethodContext(tiny_config("vlc"), single_device(), TOKENS, 10))
  itm = pretrained_vlc.predict_fns()["match_score"](source, images, tokens)
  np.testing.assert_allclose(score, itm, rtol=1e-5, atol=1e-6)


def test_a_run_of_another_model_fails_naming_the_parameters(pretraining_params):
  source = jax.tree.map(np.array, pretraining_params)  # A copy to break.
  source["encoder"]["conv1"]["kernel"] = np.zeros((8, 8, 3, 48), np.float32)
  fresh = init(task_method("vqa"))
  with pytest.raises(ConfigError, match=r"encoder/conv1/kernel is \(8, 8, 3, 48\) there"):
    vlc_tasks.transfer_pretrained(fresh, source, "vqa")
  del source["encoder"]
  with pytest.raises(ConfigError, match="no 'encoder' parameters"):
    vlc_tasks.transfer_pretrained(fresh, source, "vqa")


def test_create_refuses_what_it_cannot_fine_tune(tmp_path):
  def create(task: str, config: ml_collections.ConfigDict) -> vlc_tasks.VlcTask:
    return vlc_tasks.create(MethodContext(config, single_device(), TOKENS, 10), task)

  with pytest.raises(ValueError, match=r"config\.finetune\.train is empty"):
    create("vqa", tiny_config(train=""))
  with pytest.raises(ValueError, match="num_negatives=8: needs that many other rows"):
    create("retrieval", tiny_config("vlc_retrieval", num_negatives=8))
  config = tiny_config("vlc_retrieval", pretrained=str(tmp_path))
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match=r"init_from and config\.finetune\.pretrained"):
    create("retrieval", config)
  with pytest.raises(ValueError, match="is not a directory"):
    create("retrieval", tiny_config("vlc_retrieval", pretrained=str(tmp_path / "nowhere")))
  config = tiny_config("vlc_retrieval")
  config.model.image.init = "timm:/mae.pth"
  with pytest.raises(
    ValueError, match=r"config\.model\.image\.init: fine-tuning starts from a VLC"
  ):
    create("retrieval", config)
  method = create("retrieval", tiny_config("vlc_retrieval", num_negatives=7))
  assert method.name == "vlc_retrieval" and method.num_negatives == 7


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
  return finetune.BuiltinSets(str(tmp_path_factory.mktemp("tasks")), 40, 14, 32, 0)


def test_the_generated_nlvr2_set_can_keep_some_statement_kinds(tmp_path):
  sets = finetune.BuiltinSets(str(tmp_path), 12, 6, 32, 0, "both_colour")
  _, train = finetune.read_nlvr2_spec("builtin", True, sets)
  _, everything = finetune.read_nlvr2_spec(
    "builtin", True, dataclasses.replace(sets, nlvr2_statements="")
  )
  assert len(train) == 12 and sum(e.label for e in train) == 6  # One true pair per statement.
  assert all(e.sentence.startswith("both images contain a ") for e in train)
  assert any(not e.sentence.startswith("both images") for e in everything)
  with pytest.raises(ValueError, match=r"nlvr2_statements: \['colours'\] are not among"):
    finetune.read_nlvr2_spec("builtin", True, dataclasses.replace(sets, nlvr2_statements="colours"))


def test_vqa_and_nlvr2_results_use_the_official_metrics_and_files(builtin_sets, tmp_path):
  _, train = finetune.read_vqa_spec("builtin", True, builtin_sets)
  _, val = finetune.read_vqa_spec("builtin", False, builtin_sets)
  answers = vqa.build_answer_vocab(train, 1)
  favourite = answers.index("yes")

  def vqa_logits(params, images, tokens):  # Always "yes".
    return jnp.broadcast_to(jax.nn.one_hot(favourite, len(answers)), (len(images), len(answers)))

  _, dev = finetune.read_nlvr2_spec("builtin", False, builtin_sets)

  def nlvr2_logits(params, left, right, tokens):  # True when the left image is brighter.
    brighter = jnp.mean(left, axis=(1, 2, 3)) > jnp.mean(right, axis=(1, 2, 3))
    return jax.nn.one_hot(brighter.astype(jnp.int32), 2)

  embedder = mesh_embedder(WordTokenizer())
  results = finetune.VqaTask("builtin-vqa", val, answers, vqa_logits).evaluate(embedder, {})
  statement_kind = finetune.builtin_statement_kind
  nlvr2_task = finetune.Nlvr2Task("builtin-nlvr2", dev, nlvr2_logits, statement_kind)
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
  assert set(by_kind) <= set(builtin_tasks.STATEMENT_KINDS) and len(by_kind) >= 3
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
  task = finetune.ItmRetrievalTask(data, fns, (1, 5))
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
  every_pair = finetune.ItmRetrievalTask(data, method.predict_fns(), (1, 2, 5))
  (expected,) = every_pair.evaluate(embedder, params)
  shortlist = finetune.load_dual_encoder(clip_run)
  whole = finetune.ItmRetrievalTask(data, method.predict_fns(), (1, 2, 5), shortlist, 9)
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
  shortlist = finetune.load_dual_encoder(clip_run)
  texts = [c for captions in data.captions for c in captions]
  owner = np.repeat(np.arange(6), [len(c) for c in data.captions])
  image_emb, text_emb = shortlist.embed(embedder, data.images, texts)
  # The CLIP's own nearest image of each text: a hit exactly when it is the right one.
  nearest = np.argsort(-(text_emb @ image_emb.T), axis=1, kind="stable")[:, 0]
  in_shortlist = np.mean(nearest == owner)
  task = finetune.ItmRetrievalTask(data, fns, (1, 5), shortlist, 1)
  (result,) = task.evaluate(embedder, {})
  assert in_shortlist < 1  # Two steps of training: some true images are not shortlisted.
  # Re-ranking is perfect, so only the shortlist misses; recall@5 gets none of them back.
  assert result.metrics["image_retrieval_recall@1"] == pytest.approx(in_shortlist)
  assert result.metrics["image_retrieval_recall@5"] == pytest.approx(in_shortlist)
  (every_pair,) = finetune.ItmRetrievalTask(data, fns, (1,)).evaluate(embedder, {})
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
  from_run = finetune.load_dual_encoder(clip_run).embed(embedder, data.images, texts)
  converted = finetune.load_dual_encoder(str(tmp_path / "clip")).embed(embedder, data.images, texts)
  for a, b in zip(from_run, converted):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_bad_shortlist_fails_naming_the_config_key(clip_run, pretrained_run, tmp_path):
  data = grey_gallery(tmp_path)
  fns = task_method("retrieval").predict_fns()

  def create(shortlist: str, k: int = 4):
    config = tiny_config("vlc_retrieval", shortlist=shortlist, shortlist_k=k)
    config.eval.data.itm_retrieval = "heldout"
    return finetune.create_tasks(["itm_retrieval"], config, fns, lambda: data)

  for path in (str(tmp_path / "nowhere"), str(tmp_path)):  # Missing; neither run nor CLIP.
    with pytest.raises(ConfigError, match=r"config\.finetune\.shortlist: "):
      create(path)
  with pytest.raises(ConfigError, match=r"config\.finetune\.shortlist: .* not a dual encoder"):
    create(pretrained_run)  # A VLC run has no embeddings.
  with pytest.raises(ValueError, match=r"config\.finetune\.shortlist_k=0"):
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
  method = vlc_tasks.create(MethodContext(config, single_device(), TOKENS, 10), "classify")
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
  tasks = finetune.create_tasks(["classify_finetuned"], config, {"class_logits": class_logits})
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
  builtin = finetune.BuiltinSets.from_config(config)
  _, train = finetune.read_vqa_spec("builtin", True, builtin)
  _, val = finetune.read_vqa_spec("builtin", False, builtin)
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
  builtin = finetune.BuiltinSets.from_config(config)
  _, train = finetune.read_nlvr2_spec("builtin", True, builtin)
  _, dev = finetune.read_nlvr2_spec("builtin", False, builtin)
  baseline = nlvr2.majority_baseline(train, dev) / 100
  by_kind = {k.split("/")[1]: round(v, 3) for k, v in metrics.items() if "accuracy/" in k}
  print(
    f"NLVR2 accuracy {metrics['accuracy']:.3f} (consistency {metrics['consistency']:.3f}); "
    f"majority label {baseline:.3f}; by statement kind {by_kind}"
  )
  assert by_kind and set(by_kind) <= set(builtin_tasks.STATEMENT_KINDS)
  assert metrics["num_examples"] == 32 and metrics["num_sentences"] == 16
  assert 0 <= metrics["consistency"] <= metrics["accuracy"] <= 1
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert np.isfinite([entry["nlvr2_loss"] for entry in logged]).all()
