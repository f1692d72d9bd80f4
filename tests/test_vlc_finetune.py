"""VLC's fine-tuning methods (methods/vlc_finetune.py and one module per task): the VQA
loss against NumPy, NLVR2's two passes with token types 1 and 2, retrieval's negatives
and frozen ITM head, layer-wise learning rates, loading a pretraining run's encoder (and
its ITM head into the rank head), and what create() refuses. Their evaluation and end to
end runs: test_vlc_finetune_eval.py."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlp_jax import experiment, optim, sharding
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import common, demo
from vlp_jax.methods import (
  METHODS,
  MethodContext,
  vlc,
  vlc_classify,
  vlc_nlvr2,
  vlc_retrieval,
  vlc_vqa,
)
from vlp_jax.methods.vlc_finetune import VlcFinetune
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


def shrink_vlc(
  config: ml_collections.ConfigDict, method: str, **finetune_fields
) -> ml_collections.ConfigDict:
  """A VLC `config` at test size (32 px, 8 px patches: 16, width 32, 2 blocks), its
  config.method `method` and the given config.finetune fields."""
  config.unlock()
  common.use_method(config, method)  # Adds its config.finetune.
  image = config.model.image
  image.image_size, image.width, image.depth, image.num_heads, image.mlp_dim = 32, 32, 2, 2, 64
  config.vlc.decoder_width, config.vlc.decoder_depth = 32, 1
  config.vlc.decoder_num_heads, config.vlc.decoder_mlp_dim = 2, 64
  for key, value in finetune_fields.items():
    config.finetune[key] = value
  return config


def tiny_config(method: str = "vlc_vqa", **finetune_fields) -> ml_collections.ConfigDict:
  """demo.py:method=vlc at test size."""
  return shrink_vlc(demo.get_config("method=vlc,steps=3,batch_size=8"), method, **finetune_fields)


def single_device():
  return sharding.create_mesh({"data": 1}, jax.devices()[:1])


def encoder() -> SingleStreamEncoder:
  return vlc.create_model(tiny_config(), 64, 0, 12).encoder


# task -> (method class, model class): each fine-tuning task's own module.
TASKS = {
  "vqa": (vlc_vqa.VlcVqa, vlc_vqa.VqaModel),
  "nlvr2": (vlc_nlvr2.VlcNlvr2, vlc_nlvr2.Nlvr2Model),
  "retrieval": (vlc_retrieval.VlcRetrieval, vlc_retrieval.RetrievalModel),
  "classify": (vlc_classify.VlcClassify, vlc_classify.ClassifyModel),
}
NEW_HEADS = {head for method, _ in TASKS.values() for head in method.new_heads}


def task_method(task: str, num_outputs: int = 5, **fields) -> VlcFinetune:
  """A task's method without reading any data (create() reads the task's training set)."""
  method, model = TASKS[task]
  if task == "vqa":
    fields["answers"] = tuple(f"a{i}" for i in range(num_outputs))
  return method(
    model=model(encoder(), num_outputs),
    context_length=12,
    optim_config=tiny_config().optim,
    **fields,
  )


def create_task(task: str, config: ml_collections.ConfigDict) -> VlcFinetune:
  """config.method "vlc_<task>" as the trainer builds it."""
  return METHODS[f"vlc_{task}"](MethodContext(config, single_device(), TOKENS, 10))


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
  np.testing.assert_allclose(float(vlc_vqa.vqa_loss(logits, targets)), expected, rtol=1e-5)


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
  columns = np.asarray(vlc_retrieval.negative_captions(jax.random.PRNGKey(3), 8, 5))
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
    loaded = method.transfer_pretrained(fresh, source)
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
    for head in set(fresh) & NEW_HEADS:  # New heads stay new.
      jax.tree.map(np.testing.assert_array_equal, loaded[head], fresh[head])
    assert "decoder" not in loaded and "mlm_head" not in loaded

  # The rank head starts as the ITM head's "matched" logit.
  method = task_method("retrieval")
  params = method.transfer_pretrained(init(method), source)
  images, tokens = random_inputs()
  score = method.predict_fns()["match_score"](params, images, tokens)
  pretrained_vlc = vlc.create(MethodContext(tiny_config("vlc"), single_device(), TOKENS, 10))
  itm = pretrained_vlc.predict_fns()["match_score"](source, images, tokens)
  np.testing.assert_allclose(score, itm, rtol=1e-5, atol=1e-6)


def test_a_run_of_another_model_fails_naming_the_parameters(pretraining_params):
  source = jax.tree.map(np.array, pretraining_params)  # A copy to break.
  source["encoder"]["conv1"]["kernel"] = np.zeros((8, 8, 3, 48), np.float32)
  method = task_method("vqa")
  fresh = init(method)
  with pytest.raises(ConfigError, match=r"encoder/conv1/kernel is \(8, 8, 3, 48\) there"):
    method.transfer_pretrained(fresh, source)
  del source["encoder"]
  with pytest.raises(ConfigError, match="no 'encoder' parameters"):
    method.transfer_pretrained(fresh, source)


def test_create_refuses_what_it_cannot_fine_tune(tmp_path):
  create = create_task

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
