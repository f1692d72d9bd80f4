"""Runs that start from pretrained towers (LiT / LilT configs) and NegCLIP fine-tuning."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from vlp_jax import experiment, peft, sharding, trainer
from vlp_jax.config_lib import ConfigError
from vlp_jax.configs import lilt_b16_bert, lit_b16_bert, lit_demo, negclip_finetune
from vlp_jax.configs.common import use_method
from vlp_jax.methods import negclip as methods_negclip
from vlp_jax.weights import hf_bert
from vlp_jax.weights.state_dict import flatten


@pytest.mark.parametrize(
  ("module", "key"),
  [
    (lit_b16_bert, "config.model.image.init"),
    (lilt_b16_bert, "config.model.image.init"),
    (negclip_finetune, "config.model.init"),
  ],
)
def test_missing_pretrained_checkpoints_fail_naming_key_and_path(module, key, tmp_path):
  config = module.get_config()
  with pytest.raises(ConfigError, match=rf"{key}: checkpoint 'pretrained/.*' does not exist"):
    trainer.create_experiment(config, str(tmp_path))
  config.unlock()
  config.model.image.init = config.model.init = ""
  if module is not negclip_finetune:
    with pytest.raises(ConfigError, match=r"config.model.text.init: checkpoint 'pretrained/"):
      trainer.create_experiment(config, str(tmp_path))


def test_lilt_trains_about_seven_percent_of_vit_b16_plus_bert_base():
  config = lilt_b16_bert.get_config()
  mesh = sharding.create_mesh({"data": -1})
  tokenizer = experiment.TokenizerSpec(30_522, 0, config.model.text.context_length)
  parts = experiment.create_step_parts(config, mesh, tokenizer, total_steps=10)
  abstract, _ = trainer.abstract_train_state(parts.method, parts.tx, mesh, 0)
  trainable, total = peft.count(abstract.params, parts.method.labels)
  width, depth, embed = 768, 12, 256
  adapter = width * (width // 4) + width // 4 + (width // 4) * width + width  # down + up
  per_block = 2 * adapter + 2 * 2 * width  # two adapters, two layer norms
  vit = depth * per_block + 2 * 2 * width + width * embed  # + ln_pre, ln_post, proj
  bert = depth * per_block + 2 * width + width * embed + embed  # + embedding LN, projection
  assert trainable == vit + bert + 1  # + the temperature
  share = trainable / total
  print(f"LilT ViT-B/16 + BERT-base: {trainable:,} of {total:,} parameters train ({share:.2%})")
  assert 0.065 < share < 0.075
  # Frozen parameters hold no optimizer state: Adam's two moments cover the trainable ones.
  state_size = sum(x.size for x in jax.tree.leaves(abstract.opt_state))
  assert 2 * trainable <= state_size < 2 * trainable + 16


def _tiny_lit_demo(cache_dir, text):
  config = lit_demo.get_config(f"text={text},steps=2,batch_size=16")
  config.unlock()
  config.data.cache_dir = cache_dir
  config.data.builtin.num_train = 256
  config.data.builtin.num_heldout = 64
  config.data.builtin.image_size = 32
  config.data.num_workers = 0
  config.model.image.image_size = 32
  config.model.image.depth = 1
  config.eval.batch_size = 32
  config.eval.every_steps = 0
  return config


def test_lit_demo_starts_from_minilm_and_keeps_the_frozen_tower(cache_dir, tmp_path):
  config = _tiny_lit_demo(cache_dir, "frozen")
  exp = trainer.create_experiment(config, str(tmp_path))
  assert exp.tokenizer.vocab_size == 30_522
  state, state_sharding = trainer.create_train_state(exp.method, exp.tx, exp.mesh, 0)
  state = trainer._initialise_params(exp, state, state_sharding)
  model_dir = lit_demo.minilm_dir()
  expected = flatten(hf_bert.import_hf_bert(model_dir, jax.device_get(state.params["text"])))
  before = flatten(jax.device_get(state.params))
  word_embeddings = "text/embeddings/word_embeddings/embedding"
  np.testing.assert_array_equal(
    before[word_embeddings], expected["embeddings/word_embeddings/embedding"]
  )
  step_fn = trainer.compile_step(exp, state_sharding)
  for batch in trainer_batches(exp, 2):
    state, _ = step_fn(state, batch)
  after = flatten(jax.device_get(state.params))
  for path in before:
    if path.startswith("text/"):
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)
  assert not np.array_equal(before["visual/conv1/kernel"], after["visual/conv1/kernel"])


def trainer_batches(exp, num):
  from tests.runs import first_batches

  return [sharding.host_to_global(b, exp.mesh) for b in first_batches(exp, num)]


def test_negclip_run_mines_hard_images_and_trains(tiny_config, tmp_path):
  use_method(tiny_config, "negclip")
  tiny_config.negclip.tagger = "lexicon"
  tiny_config.total_steps = 3
  workdir = Path(tmp_path, "run")
  metrics = trainer.train_and_evaluate(tiny_config, str(workdir))
  assert 0.0 <= metrics["image_retrieval_recall@1"] <= 1.0
  neighbours = methods_negclip.load_neighbours(str(workdir), 256)
  assert neighbours.shape == (256,) and (neighbours != np.arange(256)).all()
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2, 3]
  assert all(np.isfinite(m["loss"]) and 0 <= m["train_swap_accuracy"] <= 1 for m in logged)


def test_negclip_refuses_an_unknown_tagger_before_any_compute(tiny_config, tmp_path):
  use_method(tiny_config, "negclip")
  tiny_config.negclip.tagger = "nltk"
  with pytest.raises(ConfigError, match=r"config\.negclip\.tagger"):
    trainer.create_experiment(tiny_config, str(tmp_path))
