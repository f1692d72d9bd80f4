"""Hugging Face BERT-family encoders (BERT, MiniLM, SimCSE, sentence-transformers) ->
models.bert.BertTextTower parameters.

The checkpoint is read without unpickling code (state_dict.read_state_dict). Keys may carry
a prefix ("bert.", "model.", any other found in front of the word embeddings); the pooler,
the `position_ids` buffer and pre-training heads (cls.*) are not used. Position embeddings
beyond the tower's context_length are dropped. Parameters the checkpoint does not have
(text_projection, adapters, LoRA factors) keep the template's values; any other missing,
mis-shaped or unused key is named in the WeightsError.

ALBEF's text encoder (models.albef.AlbefText) takes the same import: its fusion layers'
cross_query / cross_key / cross_value / cross_output / cross_ln load from a checkpoint's
`crossattention` blocks where it has them and otherwise start random, and its mlm_head
loads from BERT's `cls.predictions` head (transform, LayerNorm, bias; the decoder is the
tied word embedding) when the checkpoint has one (BertForMaskedLM, bert-base-uncased).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vlp_jax.weights import mapping
from vlp_jax.weights.state_dict import StateDictReader, WeightsError, fill_params, flatten

_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
# Checkpoint keys nothing in the tower corresponds to (after the prefix is removed).
_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")
# Template parameters a BERT checkpoint never holds.
_NEW_PARAMS = re.compile(
  r"(^|/)(text_projection|adapter_[^/]*|cross_[^/]*|mlm_head/[^/]*)/|/lora_[ab]$|^mlm_head/bias$"
)

# Hugging Face hidden_act -> models.bert.ACTIVATIONS key.
_HF_ACTIVATIONS = {
  "gelu": "gelu",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "relu": "relu",
}


def bert_config_from_hf(model_dir: str) -> dict[str, Any]:
  """BertTextTower's architecture fields from a Hugging Face model directory's config.json.

  Returns {vocab_size, width, depth, num_heads, mlp_dim, type_vocab_size, layer_norm_eps,
  activation, pad_id, max_position_embeddings, lower_case}: the first eight are tower
  fields as they are; the tower's context_length must not exceed max_position_embeddings;
  lower_case is the tokenizer's do_lower_case from tokenizer_config.json (None if the
  directory does not say).
  """
  path = os.path.join(model_dir, "config.json")
  with open(path) as f:
    config = json.load(f)
  model_type = config.get("model_type", "bert")
  if model_type != "bert":
    raise ValueError(f"{path}: model_type {model_type!r} is not a BERT encoder")
  position_type = config.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(f"{path}: position_embedding_type {position_type!r} is not supported")
  hidden_act = config.get("hidden_act", "gelu")
  if hidden_act not in _HF_ACTIVATIONS:
    raise ValueError(f"{path}: hidden_act {hidden_act!r} is not one of {tuple(_HF_ACTIVATIONS)}")
  lower_case = mapping.json_beside(model_dir, "tokenizer_config.json").get("do_lower_case")
  return {
    "vocab_size": config["vocab_size"],
    "width": config["hidden_size"],
    "depth": config["num_hidden_layers"],
    "num_heads": config["num_attention_heads"],
    "mlp_dim": config["intermediate_size"],
    "type_vocab_size": config.get("type_vocab_size", 2),
    "layer_norm_eps": config.get("layer_norm_eps", 1e-12),
    "activation": _HF_ACTIVATIONS[hidden_act],
    "pad_id": config.get("pad_token_id", 0) or 0,
    "max_position_embeddings": config["max_position_embeddings"],
    "lower_case": lower_case,
  }


def _strip_prefix(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """The state dict with the encoder's prefix removed from its keys, and that prefix.

  Keys outside the prefix keep their names (they end up listed as unused unless ignored).
  """
  found = [k for k in state_dict if k.endswith(_WORD_EMBEDDINGS)]
  if not found:
    raise WeightsError(f"no {_WORD_EMBEDDINGS!r} key: not a BERT-family state dict")
  prefix = min(found, key=len)[: -len(_WORD_EMBEDDINGS)]
  if not prefix:
    return dict(state_dict), prefix
  renamed = {}
  for key, value in state_dict.items():
    renamed[key[len(prefix) :] if key.startswith(prefix) else key] = value
  return renamed, prefix


def _layer_norm_weight(reader: StateDictReader, name: str, kind: str) -> np.ndarray | None:
  """LayerNorm weight/bias, also under the old gamma/beta names."""
  old = {"weight": "gamma", "bias": "beta"}[kind]
  if f"{name}.{kind}" not in reader and f"{name}.{old}" in reader:
    return reader.get(f"{name}.{old}")
  return reader.get(f"{name}.{kind}")


def import_hf_bert(path_or_state_dict: str | Mapping[str, Any], template_params: Any) -> Any:
  """BertTextTower parameters with the encoder weights of a Hugging Face BERT checkpoint.

  `path_or_state_dict`: a model directory (model.safetensors or pytorch_model.bin), a
  checkpoint file, or a name -> array mapping. `template_params`: the tower's initialised
  parameters (or a {"params": ...} variables dict, returned in kind); it fixes the depth,
  the context length and what keeps its initial value. Raises WeightsError naming every
  missing, mis-shaped or unexpected key.
  """
  state_dict = mapping.as_state_dict(path_or_state_dict)
  source = path_or_state_dict if isinstance(path_or_state_dict, str) else "state dict"
  if isinstance(template_params, Mapping) and set(template_params) == {"params"}:
    return {"params": import_hf_bert(state_dict, template_params["params"])}
  state_dict, _ = _strip_prefix(state_dict)
  reader = StateDictReader(state_dict, source)
  template_flat = flatten(template_params)

  values: dict[str, np.ndarray | None] = {}

  def linear(ours: str, theirs: str) -> None:
    weight = reader.get(f"{theirs}.weight")
    values[f"{ours}/kernel"] = None if weight is None else weight.T
    values[f"{ours}/bias"] = reader.get(f"{theirs}.bias")

  def layer_norm(ours: str, theirs: str) -> None:
    values[f"{ours}/scale"] = _layer_norm_weight(reader, theirs, "weight")
    values[f"{ours}/bias"] = _layer_norm_weight(reader, theirs, "bias")

  for name in ("word_embeddings", "token_type_embeddings"):
    values[f"embeddings/{name}/embedding"] = reader.get(f"embeddings.{name}.weight")
  positions = reader.get("embeddings.position_embeddings.weight")
  ours = "embeddings/position_embeddings/embedding"
  if positions is not None and ours in template_flat:
    wanted = template_flat[ours].shape[0]
    if positions.shape[0] > wanted:  # Absolute positions: the first `wanted` still fit.
      positions = positions[:wanted]
  values[ours] = positions
  layer_norm("embeddings/LayerNorm", "embeddings.LayerNorm")

  depth = len({p.split("/")[0] for p in template_flat if re.match(r"layer_\d+/", p)})
  for i in range(depth):
    theirs = f"encoder.layer.{i}"
    for name in ("query", "key", "value"):
      linear(f"layer_{i}/{name}", f"{theirs}.attention.self.{name}")
    linear(f"layer_{i}/attention_output", f"{theirs}.attention.output.dense")
    layer_norm(f"layer_{i}/attention_ln", f"{theirs}.attention.output.LayerNorm")
    linear(f"layer_{i}/intermediate", f"{theirs}.intermediate.dense")
    linear(f"layer_{i}/output", f"{theirs}.output.dense")
    layer_norm(f"layer_{i}/output_ln", f"{theirs}.output.LayerNorm")
    cross = f"{theirs}.crossattention"
    if f"layer_{i}/cross_query/kernel" in template_flat and f"{cross}.self.query.weight" in reader:
      for name in ("query", "key", "value"):
        linear(f"layer_{i}/cross_{name}", f"{cross}.self.{name}")
      linear(f"layer_{i}/cross_output", f"{cross}.output.dense")
      layer_norm(f"layer_{i}/cross_ln", f"{cross}.output.LayerNorm")

  head = "cls.predictions"
  if "mlm_head/transform/kernel" in template_flat and f"{head}.transform.dense.weight" in reader:
    linear("mlm_head/transform", f"{head}.transform.dense")
    layer_norm("mlm_head/transform_ln", f"{head}.transform.LayerNorm")
    values["mlm_head/bias"] = reader.get(f"{head}.bias")

  return fill_params(
    template_params,
    values,
    reader=reader,
    allow_missing=lambda path: bool(_NEW_PARAMS.search(path)),
    ignore_unused=lambda key: bool(_IGNORED.match(key)),
  )
